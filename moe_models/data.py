"""Training text: loading it, packing it into fixed-length token blocks, and batching it per rank.

Without a file or hub dataset the built-in synthetic corpus is used: short, regular examples from a few
clearly different domains (arithmetic, sorting, brackets, key-value recall, prose), tagged with their
domain so that expert routing can be analysed per domain.
"""

from __future__ import annotations

import itertools
import math
import random
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from datasets import Dataset, DatasetDict, load_dataset
from huggingface_hub import constants as hub_constants
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from .config import DataConfig

# ---------------------------------------------------------------------------------------------
# Built-in synthetic corpus

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_CLOSER = {"(": ")", "[": "]", "{": "}"}
_SUBJECTS = ("the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour")
_VERBS = ("sees", "likes", "finds", "follows", "helps", "watches", "paints")
_OBJECTS = ("the red ball", "a green tree", "the quiet river", "a warm house", "the big city", "an open door")
_ENDINGS = ("today", "at night", "in the morning", "every day", "again", "near the sea")


def _arithmetic(rng: random.Random) -> str:
    """Two-digit addition: ``37+48=85``."""
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}={a + b}"


def _sorting(rng: random.Random) -> str:
    """Digits and the same digits sorted: ``sort 9 2 7 -> 2 7 9``."""
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 7))]
    return f"sort {' '.join(map(str, digits))} -> {' '.join(map(str, sorted(digits)))}"


def _brackets(rng: random.Random) -> str:
    """An unfinished bracket string and the closers that balance it: ``([]{ -> })``."""
    open_stack: list[str] = []
    prefix: list[str] = []
    for _ in range(rng.randint(2, 10)):
        if len(open_stack) > 1 and rng.random() < 0.4:  # keep at least one bracket open
            prefix.append(_CLOSER[open_stack.pop()])
        else:
            opener = rng.choice("([{")
            open_stack.append(opener)
            prefix.append(opener)
    closing = "".join(_CLOSER[opener] for opener in reversed(open_stack))
    return f"{''.join(prefix)} -> {closing}"


def _kv_recall(rng: random.Random) -> str:
    """Key-value pairs, then one key's value: ``k3=q k1=z k7=a ? k1 -> z``."""
    keys = rng.sample(range(10), rng.randint(3, 5))
    values = [rng.choice(_LETTERS) for _ in keys]
    asked = rng.randrange(len(keys))
    pairs = " ".join(f"k{key}={value}" for key, value in zip(keys, values))
    return f"{pairs} ? k{keys[asked]} -> {values[asked]}"


def _prose(rng: random.Random) -> str:
    """A template sentence from small word lists: ``The cat likes a green tree at night.``"""
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
    return sentence[0].upper() + sentence[1:]


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "brackets": _brackets,
    "kv_recall": _kv_recall,
    "prose": _prose,
}
DOMAINS: tuple[str, ...] = tuple(_GENERATORS)
_DOMAIN_INDEX = {domain: index for index, domain in enumerate(DOMAINS)}


def synthetic_corpus(num_examples: int, seed: int) -> Dataset:
    """``num_examples`` examples, as evenly spread over DOMAINS as possible and shuffled together.

    Columns: ``text`` and ``domain``. Deterministic in (num_examples, seed); global RNG state is untouched.
    """
    rng = random.Random(seed)
    domains = [DOMAINS[i % len(DOMAINS)] for i in range(num_examples)]
    rng.shuffle(domains)
    texts = [_GENERATORS[domain](rng) for domain in domains]
    return Dataset.from_dict({"text": texts, "domain": domains})


# ---------------------------------------------------------------------------------------------
# Loading raw text

_FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                  ".csv": "csv"}


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
    builder = _FILE_BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise ValueError(f"{path!r}: unsupported extension; use one of {', '.join(_FILE_BUILDERS)}")
    dataset = load_dataset(builder, data_files={"train": path}, split="train")
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


# ---------------------------------------------------------------------------------------------
# Packing into blocks


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
    domain_ids = [[_DOMAIN_INDEX.get(domain, -1)] * len(ids) for domain, ids in zip(batch["domain"], input_ids)]
    return {"input_ids": input_ids, "domain_ids": domain_ids}


def _group_into_blocks(batch: dict, block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate each column's token lists and cut them into ``block_size`` pieces (run_clm's group_texts)."""
    streams = {column: list(itertools.chain.from_iterable(lists)) for column, lists in batch.items()}
    usable = len(streams["input_ids"]) // block_size * block_size
    return {column: [tokens[start:start + block_size] for start in range(0, usable, block_size)]
            for column, tokens in streams.items()}


# ---------------------------------------------------------------------------------------------
# Batches per data-parallel rank


def _as_tensors(dataset: Dataset) -> Dataset:
    """The block columns as int64 torch tensors, so the default collate stacks them into [B, T]."""
    columns = [c for c in ("input_ids", "domain_ids") if c in dataset.column_names]
    return dataset.with_format("torch", columns=columns)


def _loader(dataset: Dataset, batch_size: int, indices: list[int], drop_last: bool) -> DataLoader:
    """Batches of ``dataset[indices]`` in that order, in this process."""
    # An explicit generator: a DataLoader otherwise draws its base seed from the global torch RNG on every
    # iter(), which would shift model-side randomness (init, dropout, gate noise) depending on data reads.
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, drop_last=drop_last, num_workers=0,
                      generator=torch.Generator())


class TrainBatches:
    """Endless ``{"input_ids": LongTensor[B, T]}`` batches (plus "domain_ids" if present) for one rank.

    Every epoch each rank reads its own disjoint share of a fresh seeded shuffle (DistributedSampler with
    set_epoch). ``state_dict``/``load_state_dict`` resume exactly where a run stopped.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int):
        self.dataset = _as_tensors(dataset)
        self.batch_size = batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        if self.sampler.num_samples < batch_size:
            raise ValueError(f"rank {rank} of {world_size} gets {self.sampler.num_samples} of the {len(dataset)} "
                             f"training blocks, fewer than one batch of {batch_size}. Use more data, a smaller "
                             "--block_size or a smaller --per_device_train_batch_size.")
        self.epoch = 0
        self.batches_in_epoch = 0
        self._batches: Optional[Iterator[dict[str, torch.Tensor]]] = None

    @property
    def batches_per_epoch(self) -> int:
        """Full batches this rank reads per epoch."""
        return self.sampler.num_samples // self.batch_size

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self._epoch_loader())
        batch = next(self._batches, None)
        if batch is None:  # epoch done: the next one reshuffles
            self.epoch, self.batches_in_epoch, self._batches = self.epoch + 1, 0, None
            return next(self)
        self.batches_in_epoch += 1
        return batch

    def _epoch_loader(self) -> DataLoader:
        """This epoch's batches from ``batches_in_epoch`` on."""
        # torch samplers cannot start mid-epoch, so resuming slices the epoch's index order instead of
        # loading and discarding the batches already read.
        self.sampler.set_epoch(self.epoch)
        remaining = list(self.sampler)[self.batches_in_epoch * self.batch_size:]
        return _loader(self.dataset, self.batch_size, remaining, drop_last=True)

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch: the epoch and how many of its batches were already read."""
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a ``state_dict()``: the next batch is the one the saved iterator would have given."""
        if not 0 <= state["batches_in_epoch"] <= self.batches_per_epoch:
            raise ValueError(f"saved data position {state} does not fit this run's {self.batches_per_epoch} "
                             "batches per epoch; resume with the same data, batch size and number of ranks")
        self.epoch, self.batches_in_epoch, self._batches = state["epoch"], state["batches_in_epoch"], None


def eval_batches(dataset: Dataset, batch_size: int, rank: int, world_size: int,
                 max_batches: int = 0) -> DataLoader:
    """This rank's share of ``dataset`` in order, as batches like TrainBatches', at most ``max_batches`` (0 = all).

    Every rank gets the same number of batches (DistributedSampler repeats a few blocks to even out
    the shares), so collective MoE communication stays in step. The result can be iterated repeatedly.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
    indices = list(sampler)
    if max_batches > 0:
        indices = indices[:max_batches * batch_size]
    return _loader(_as_tensors(dataset), batch_size, indices, drop_last=False)
