"""Training text: loading it (local files, a hub dataset, or the built-in synthetic corpus) and packing it into
fixed-length token blocks."""

from __future__ import annotations

import itertools
import json
import math
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError
from huggingface_hub import constants as hub_constants
from transformers import PreTrainedTokenizerBase

from ..run.config import DataConfig
from ..run.config_values import too_small
from .domains import domain_index, domains_problems
from .file_specs import DataFile, data_files, resolve_files
from .files import unreadable_reason
from .formats import RECORD, SOURCE, TEXT, format_columns, format_of
from .synthetic import DOMAINS, synthetic_corpus, synthetic_domain_problems, synthetic_domains


def data_problems(data: DataConfig) -> list[str]:
    """Problems in the data settings that show before any text is read."""
    problems = []
    if data.train_file and data.dataset_name:
        problems.append("give either --train_file or --dataset_name, not both")
    for name in ("train_file", "validation_file"):
        if getattr(data, name) is not None:
            problems += resolve_files(name, getattr(data, name))[1]
    if data.validation_file and not (data.train_file or data.dataset_name):
        problems.append("--validation_file needs --train_file or --dataset_name (the built-in corpus has its own "
                        "held-out split)")
    problems += domains_problems(data.domains) + streaming_problems(data)
    problems += synthetic_domain_problems(data.synthetic_domains)
    if data.chat_template and not Path(data.chat_template).is_file():
        problems.append(f"--chat_template {data.chat_template!r} is not a file; give a Jinja chat template file")
    problems += too_small(data, ("block_size", "synthetic_examples"))
    problems += too_small(data, ("shuffle_buffer_size", "streaming_validation_texts"), minimum=0)
    if not 0 < data.validation_split_percentage < 100:
        problems.append(f"validation_split_percentage ({data.validation_split_percentage}) must be in 1..99")
    return problems


def streaming_problems(data: DataConfig) -> list[str]:
    """What --streaming cannot do."""
    if not data.streaming:
        return []
    if not (data.train_file or data.dataset_name):
        return ["--streaming reads --train_file or --dataset_name; the built-in corpus is made in memory and needs no "
                "stream: drop --streaming, or give --train_file"]
    if data.streaming_validation_texts == 0 and not data.validation_file:
        return ["--streaming with --streaming_validation_texts 0 leaves nothing to evaluate on: give a "
                "--validation_file, or hold out some texts (--streaming_validation_texts 1000)"]
    return []


def load_text_datasets(data: DataConfig, seed: int) -> DatasetDict:
    """Splits "train" and "validation" with the text in column ``data.text_column`` (plus ``domain`` if present).

    Source: ``--train_file``, else ``--dataset_name``, else the synthetic corpus. Validation comes from
    ``--validation_file``, else the hub dataset's validation split, else a seeded hold-out of the training data.
    """
    if data.train_file:
        splits = {"train": load_files(data_files("train_file", data.train_file), data.text_column)}
    elif data.dataset_name:
        splits = _load_hub_dataset(data.dataset_name, data.dataset_config_name, data.text_column)
    else:
        corpus = synthetic_corpus(data.synthetic_examples, seed, synthetic_domains(data.synthetic_domains))
        splits = {"train": _rename_text_column(corpus, data.text_column)}
    if data.validation_file:
        splits["validation"] = load_files(data_files("validation_file", data.validation_file), data.text_column)
        _check_one_format([("--train_file", splits["train"]), ("--validation_file", splits["validation"])])
    if "validation" not in splits:
        splits["train"], splits["validation"] = _hold_out(splits["train"], data.validation_split_percentage, seed)
    return DatasetDict({"train": splits["train"], "validation": splits["validation"]})


def load_files(files: list[DataFile], text_column: str) -> Dataset:
    """The texts of ``files`` in order, with column ``domain`` set from each file's ``name=`` entry, else kept from
    the file's own ``domain`` column (None where a file has neither, if another one has one)."""
    groups = _runs(files)
    parts = [_load_group(group, text_column) for group in groups]
    _check_one_format([(group[0].path if len(group) == 1 else f"{group[0].path} (and {len(group) - 1} more)", part)
                       for group, part in zip(groups, parts)])
    if any("domain" in part.column_names for part in parts):
        parts = [part if "domain" in part.column_names else part.add_column("domain", [None] * len(part))
                 for part in parts]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _check_one_format(parts: list[tuple[str, Dataset]]) -> None:
    """One run reads one record format (formats.py): a ValueError naming the files (or flags) of each."""
    kinds = {name: format_of(part.column_names) for name, part in parts}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{name} holds {kind}" for name, kind in kinds.items())
        raise ValueError(f"the data mix record formats ({listed}); one run reads one format: text, messages or "
                         "prompt/completion (docs/data.md#formats)")


def _runs(files: list[DataFile]) -> list[list[DataFile]]:
    """Consecutive files of the same format and domain, read by one datasets call each."""
    return [list(run) for _, run in itertools.groupby(files, key=lambda file: (file.builder, file.domain))]


def _load_group(files: list[DataFile], text_column: str) -> Dataset:
    """Files of one format and domain, read by the datasets builder of that format."""
    builder, domain, paths = files[0].builder, files[0].domain, [file.path for file in files]
    try:
        dataset = load_dataset(builder, data_files={"train": paths}, split="train")
    except (DatasetGenerationError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(unreadable_reason(paths, builder, err)) from err
    shown = paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more {builder} files)"
    if len(dataset) == 0:
        raise ValueError(f"{shown} holds no texts; give a file with at least a few lines of text")
    if builder != "text" and format_of(dataset.column_names) != TEXT:
        if len(files) > 1:  # one file at a time, so that each record is known by its file and number
            return concatenate_datasets([_load_group([file], text_column) for file in files])
        dataset = as_records(dataset, shown)
    elif builder == "text":  # the text builder always names its one column "text"
        dataset = _rename_text_column(dataset, text_column)
    else:
        dataset = _select_columns(dataset, text_column, source=shown)
    if domain is None:
        return dataset
    if "domain" in dataset.column_names:  # the entry's name wins over the file's own column
        dataset = dataset.remove_columns("domain")
    return dataset.add_column("domain", [domain] * len(dataset))


def _load_hub_dataset(name: str, config_name: Optional[str], text_column: str) -> dict[str, Dataset]:
    """The "train" (and, if there is one, "validation") split of a hub dataset."""
    try:
        loaded = load_dataset(name, config_name)
    except OSError as err:  # includes ConnectionError (offline / unreachable) and DatasetNotFoundError
        raise ValueError(hub_unreachable(name, config_name, err)) from err
    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no 'train' split (it has {', '.join(loaded)})")
    return {split: (_select_columns(loaded[split], text_column, source=f"{name} ({split} split)")
                    if format_of(loaded[split].column_names) == TEXT
                    else as_records(loaded[split], f"{name} ({split} split)"))
            for split in ("train", "validation") if split in loaded}


def as_records(dataset: Dataset, source: str) -> Dataset:
    """A conversational or prompt/completion dataset as it is tokenised (sequences.py): the format's columns as JSON
    text (so that files whose messages have different fields concatenate), ``domain`` if present, and each record's
    source and 1-based number for the messages about it."""
    columns = format_columns(format_of(dataset.column_names))
    dataset = dataset.select_columns([c for c in dataset.column_names if c in (*columns, "domain")])
    features = Features({name: Value("string") if name in columns else feature
                         for name, feature in dataset.features.items()})  # not inferred: that may give datasets' Json
    dataset = dataset.map(partial(_as_json, columns=columns), batched=True, features=features,
                          desc=f"Reading {source}")
    return dataset.add_column(SOURCE, [source] * len(dataset)).add_column(RECORD, list(range(1, len(dataset) + 1)))


def _as_json(batch: dict, columns: list[str]) -> dict[str, list[str]]:
    return {column: [json.dumps(value) for value in batch[column]] for column in columns}


def hub_unreachable(name: str, config_name: Optional[str], err: OSError) -> str:
    """Why a hub dataset could not be loaded, and the way to local files."""
    reason = ("The HF hub is not reachable: offline mode is on (HF_HUB_OFFLINE=1)." if hub_constants.HF_HUB_OFFLINE
              else "Check the name, and whether the HF hub is reachable from this machine.")
    return (f"could not load dataset {name!r} (config {config_name!r}): {err}. {reason} To train on local text "
            "instead, pass --train_file (and optionally --validation_file).")


def _rename_text_column(dataset: Dataset, text_column: str) -> Dataset:
    """Move the text from column "text" to ``text_column`` so every split uses the configured name."""
    return dataset if text_column == "text" else dataset.rename_column("text", text_column)


def _select_columns(dataset: Dataset, text_column: str, source: str) -> Dataset:
    """Keep the text column and ``domain`` (if present); raise a ValueError if the text column is missing."""
    if text_column not in dataset.column_names:
        raise ValueError(f"{source}: no column {text_column!r}; its columns are {dataset.column_names}. "
                         "Pass --text_column with the one that holds the text.")
    problem = text_column_problem(dataset, text_column, source)
    if problem:
        raise ValueError(problem)
    return dataset.select_columns([c for c in dataset.column_names if c in (text_column, "domain")])


def text_column_problem(dataset: Dataset, text_column: str, source: str) -> str | None:
    """Why the text column holds no text to train on: its values are not strings (numbers, chat message lists, all
    null), or every one is empty. Found from the column's type and its longest value, without tokenising."""
    feature = dataset.features[text_column]
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        if (pc.max(pc.utf8_length(dataset.data.column(text_column))).as_py() or 0) > 0:
            return None
        return (f"{source}: every value of column {text_column!r} is empty: there is no text to train on; check "
                "--text_column and the file")
    return value_problem(feature, text_column, source)


def value_problem(value, text_column: str, source: str) -> str:
    """The problem with a text column (or a streamed value) that is not a string."""
    kind = getattr(value, "dtype", None) if isinstance(value, Value) else type(value).__name__
    if kind in ("null", "NoneType"):
        return (f"{source}: every value of column {text_column!r} is null: there is no text to train on; check "
                "--text_column and the file")
    if isinstance(value, (list, dict)) or kind in ("list", "dict", "List", "LargeList", "Sequence"):
        return (f"{source}: column {text_column!r} holds lists or records (chat messages?), not text: name a "
                "column of conversations `messages` (a list of {role, content} each, docs/data.md#formats), or pass "
                "--text_column with the column that holds the text")
    return (f"{source}: column {text_column!r} holds {kind} values, not text; pass --text_column with the column "
            "that holds the text")


def _hold_out(dataset: Dataset, percentage: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split off ``percentage`` percent (at least one example) as validation, with a seeded shuffle."""
    num_validation = max(1, math.ceil(len(dataset) * percentage / 100))
    if num_validation >= len(dataset):
        raise ValueError(f"cannot hold out {percentage}% of {len(dataset)} training examples for validation and "
                         "keep some for training; give more data or a --validation_file")
    split = dataset.train_test_split(test_size=num_validation, seed=seed)
    return split["train"], split["test"]


def pack_blocks(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, block_size: int, text_column: str,
                num_proc: Optional[int] = None, domains: Sequence[str] = DOMAINS) -> DatasetDict:
    """Tokenize every text, append eos, concatenate and cut into blocks of exactly ``block_size`` tokens.

    As in transformers' run_clm.py, each map batch (1000 texts) is concatenated on its own and its
    remainder shorter than a block is dropped. Output column ``input_ids``; when the input has a
    ``domain`` column, also ``domain_ids``: per token, the index in ``domains`` of the domain of the text the
    token came from (-1 for none, or one not in ``domains``).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token, which is needed to separate packed texts")
    index = domain_index(domains)
    return DatasetDict({split: _pack_split(dataset, split, tokenizer, block_size, text_column, num_proc, index)
                        for split, dataset in raw.items()})


def _pack_split(dataset: Dataset, split: str, tokenizer: PreTrainedTokenizerBase, block_size: int,
                text_column: str, num_proc: Optional[int], index: dict[str, int]) -> Dataset:
    """pack_blocks for one split; raises a ValueError when it yields no block."""
    tokenized = dataset.map(partial(_tokenize_batch, tokenizer=tokenizer, text_column=text_column, index=index),
                            batched=True,
                            remove_columns=dataset.column_names, num_proc=num_proc, desc=f"Tokenizing {split}")
    blocks = tokenized.map(partial(_group_into_blocks, block_size=block_size), batched=True,
                           remove_columns=tokenized.column_names, num_proc=num_proc,
                           desc=f"Packing {split} into blocks of {block_size} tokens")
    if len(blocks) == 0:
        num_tokens = sum(len(ids) for ids in tokenized["input_ids"])
        raise ValueError(f"the {split} split gives no block of {block_size} tokens: its {len(dataset)} texts have "
                         f"{num_tokens} tokens in all. Use a smaller --block_size or more data.")
    return blocks


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, text_column: str,
                    index: dict[str, int]) -> dict[str, list]:
    """Token ids of each text followed by eos, and (with a ``domain`` column) each token's domain index."""
    input_ids = tokenize_texts(batch[text_column], tokenizer)
    if "domain" not in batch:
        return {"input_ids": input_ids}
    return {"input_ids": input_ids, "domain_ids": token_domains(batch["domain"], input_ids, index)}


def tokenize_texts(texts: Sequence[Optional[str]], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each text's token ids followed by eos (empty CSV / JSON cells arrive as None and give eos alone)."""
    token_ids = tokenizer([text or "" for text in texts], add_special_tokens=False,
                          return_attention_mask=False)["input_ids"]
    return [ids + [tokenizer.eos_token_id] for ids in token_ids]


def token_domains(domains: Sequence, input_ids: Sequence[list[int]], index: dict[str, int]) -> list[list[int]]:
    """Per text, its domain's index (-1: none or not listed) once per token."""
    return [[index.get(str(domain), -1) if domain is not None else -1] * len(ids)
            for domain, ids in zip(domains, input_ids)]


def _group_into_blocks(batch: dict, block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate each column's token lists and cut them into ``block_size`` pieces (run_clm's group_texts)."""
    streams = {column: list(itertools.chain.from_iterable(lists)) for column, lists in batch.items()}
    usable = len(streams["input_ids"]) // block_size * block_size
    return {column: [tokens[start:start + block_size] for start in range(0, usable, block_size)]
            for column, tokens in streams.items()}
