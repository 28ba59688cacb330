"""Training text: loading it (local files, a hub dataset, or the built-in synthetic corpus) and packing it into
fixed-length token blocks."""

from __future__ import annotations

import itertools
import math
from functools import partial
from pathlib import Path
from typing import Optional

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from huggingface_hub import constants as hub_constants
from transformers import PreTrainedTokenizerBase

from ..config import DataConfig, too_small
from .files import FILE_BUILDERS, file_problems, unreadable_reason
from .synthetic import DOMAIN_INDEX, synthetic_corpus


def data_problems(data: DataConfig) -> list[str]:
    """Problems in the data settings that show before any text is read."""
    problems = []
    if data.train_file and data.dataset_name:
        problems.append("give either --train_file or --dataset_name, not both")
    for name in ("train_file", "validation_file"):
        if getattr(data, name) is not None:
            problems += file_problems(name, getattr(data, name))
    if data.validation_file and not (data.train_file or data.dataset_name):
        problems.append("--validation_file needs --train_file or --dataset_name (the built-in corpus has its own "
                        "held-out split)")
    problems += too_small(data, ("block_size", "synthetic_examples"))
    if not 0 < data.validation_split_percentage < 100:
        problems.append(f"validation_split_percentage ({data.validation_split_percentage}) must be in 1..99")
    return problems


def load_text_datasets(data: DataConfig, seed: int) -> DatasetDict:
    """Splits "train" and "validation" with the text in column ``data.text_column`` (plus ``domain`` if present).

    Source: ``--train_file``, else ``--dataset_name``, else the synthetic corpus. Validation comes from
    ``--validation_file``, else the hub dataset's validation split, else a seeded hold-out of the training data.
    """
    if data.train_file:
        splits = {"train": _load_file(data.train_file, data.text_column)}
    elif data.dataset_name:
        splits = _load_hub_dataset(data.dataset_name, data.dataset_config_name, data.text_column)
    else:
        corpus = synthetic_corpus(data.synthetic_examples, seed)
        splits = {"train": _rename_text_column(corpus, data.text_column)}
    if data.validation_file:
        splits["validation"] = _load_file(data.validation_file, data.text_column)
    if "validation" not in splits:
        splits["train"], splits["validation"] = _hold_out(splits["train"], data.validation_split_percentage, seed)
    return DatasetDict({"train": splits["train"], "validation": splits["validation"]})


def _load_file(path: str, text_column: str) -> Dataset:
    """One local file, read by the datasets builder that matches its extension."""
    builder = FILE_BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise ValueError(f"{path!r}: unsupported extension; use one of {', '.join(FILE_BUILDERS)}")
    try:
        dataset = load_dataset(builder, data_files={"train": path}, split="train")
    except (DatasetGenerationError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(unreadable_reason(path, builder, err)) from err
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no texts; give a file with at least a few lines of text")
    if builder == "text":  # the text builder always names its one column "text"
        dataset = _rename_text_column(dataset, text_column)
    return _select_columns(dataset, text_column, source=path)


def _load_hub_dataset(name: str, config_name: Optional[str], text_column: str) -> dict[str, Dataset]:
    """The "train" (and, if there is one, "validation") split of a hub dataset."""
    try:
        loaded = load_dataset(name, config_name)
    except OSError as err:  # includes ConnectionError (offline / unreachable) and DatasetNotFoundError
        reason = ("The HF hub is not reachable: offline mode is on (HF_HUB_OFFLINE=1)." if hub_constants.HF_HUB_OFFLINE
                  else "Check the name, and whether the HF hub is reachable from this machine.")
        raise ValueError(f"could not load dataset {name!r} (config {config_name!r}): {err}. {reason} "
                         "To train on local text instead, pass --train_file (and optionally --validation_file).") \
            from err
    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no 'train' split (it has {', '.join(loaded)})")
    return {split: _select_columns(loaded[split], text_column, source=f"{name} ({split} split)")
            for split in ("train", "validation") if split in loaded}


def _rename_text_column(dataset: Dataset, text_column: str) -> Dataset:
    """Move the text from column "text" to ``text_column`` so every split uses the configured name."""
    return dataset if text_column == "text" else dataset.rename_column("text", text_column)


def _select_columns(dataset: Dataset, text_column: str, source: str) -> Dataset:
    """Keep the text column and ``domain`` (if present); raise a ValueError if the text column is missing."""
    if text_column not in dataset.column_names:
        raise ValueError(f"{source}: no column {text_column!r}; its columns are {dataset.column_names}. "
                         "Pass --text_column with the one that holds the text.")
    return dataset.select_columns([c for c in dataset.column_names if c in (text_column, "domain")])


def _hold_out(dataset: Dataset, percentage: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split off ``percentage`` percent (at least one example) as validation, with a seeded shuffle."""
    num_validation = max(1, math.ceil(len(dataset) * percentage / 100))
    if num_validation >= len(dataset):
        raise ValueError(f"cannot hold out {percentage}% of {len(dataset)} training examples for validation and "
                         "keep some for training; give more data or a --validation_file")
    split = dataset.train_test_split(test_size=num_validation, seed=seed)
    return split["train"], split["test"]


def pack_blocks(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, block_size: int, text_column: str,
                num_proc: Optional[int] = None) -> DatasetDict:
    """Tokenize every text, append eos, concatenate and cut into blocks of exactly ``block_size`` tokens.

    As in transformers' run_clm.py, each map batch (1000 texts) is concatenated on its own and its
    remainder shorter than a block is dropped. Output column ``input_ids``; when the input has a
    ``domain`` column, also ``domain_ids``: per token, the index in DOMAINS of the domain of the text the
    token came from (-1 for a domain not in DOMAINS).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token, which is needed to separate packed texts")
    return DatasetDict({split: _pack_split(dataset, split, tokenizer, block_size, text_column, num_proc)
                        for split, dataset in raw.items()})


def _pack_split(dataset: Dataset, split: str, tokenizer: PreTrainedTokenizerBase, block_size: int,
                text_column: str, num_proc: Optional[int]) -> Dataset:
    """pack_blocks for one split; raises a ValueError when it yields no block."""
    tokenized = dataset.map(partial(_tokenize_batch, tokenizer=tokenizer, text_column=text_column), batched=True,
                            remove_columns=dataset.column_names, num_proc=num_proc, desc=f"Tokenizing {split}")
    blocks = tokenized.map(partial(_group_into_blocks, block_size=block_size), batched=True,
                           remove_columns=tokenized.column_names, num_proc=num_proc,
                           desc=f"Packing {split} into blocks of {block_size} tokens")
    if len(blocks) == 0:
        num_tokens = sum(len(ids) for ids in tokenized["input_ids"])
        raise ValueError(f"the {split} split gives no block of {block_size} tokens: its {len(dataset)} texts have "
                         f"{num_tokens} tokens in all. Use a smaller --block_size or more data.")
    return blocks


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, text_column: str) -> dict[str, list]:
    """Token ids of each text followed by eos, and (with a ``domain`` column) each token's domain index."""
    texts = [text or "" for text in batch[text_column]]  # empty CSV / JSON cells arrive as None
    token_ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    input_ids = [ids + [tokenizer.eos_token_id] for ids in token_ids]
    if "domain" not in batch:
        return {"input_ids": input_ids}
    domain_ids = [[DOMAIN_INDEX.get(domain, -1)] * len(ids) for domain, ids in zip(batch["domain"], input_ids)]
    return {"input_ids": input_ids, "domain_ids": domain_ids}


def _group_into_blocks(batch: dict, block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate each column's token lists and cut them into ``block_size`` pieces (run_clm's group_texts)."""
    streams = {column: list(itertools.chain.from_iterable(lists)) for column, lists in batch.items()}
    usable = len(streams["input_ids"]) // block_size * block_size
    return {column: [tokens[start:start + block_size] for start in range(0, usable, block_size)]
            for column, tokens in streams.items()}
