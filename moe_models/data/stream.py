"""--streaming: the training texts as a datasets IterableDataset, read file by file (or hub shard by hub shard) as
training goes, each rank reading its own share, epoch after epoch.

The stream's shards are the files in the order given (for a hub dataset, its own shards); each is read by the
datasets builder of its format, so formats can be mixed and a ``name=`` entry tags its texts with a domain. Each
epoch shuffles the shard order and a buffer of texts with a generator seeded by --seed and the epoch (datasets'
buffer shuffle; a fixed order with --shuffle_buffer_size 0). datasets.distributed.split_dataset_by_node then gives each rank whole shards when their
number is a multiple of the number of ranks, otherwise every rank reads all of them and keeps every N-th text: either
way the ranks' shares are disjoint and together the whole stream. The first --streaming_validation_texts texts (in
the order given, before any shuffle) are held out for eval unless a --validation_file (or a hub validation split) is
given.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from itertools import islice
from typing import Iterator, Optional

from datasets import Dataset, DatasetDict, Features, IterableDataset, Value, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase

from ..run.config import DataConfig
from .domains import file_domains, listed_domains
from .file_specs import DataFile, data_files
from .files import unreadable_reason
from .formats import TEXT, format_of
from .text import hub_unreachable, load_files, pack_blocks, value_problem

FEATURES = Features({"text": Value("string"), "domain": Value("string")})


@dataclass(frozen=True)
class Shard:
    """One shard of the stream: a local file, or shard ``index`` of ``count`` of a hub dataset; ``skip`` first texts
    (held out for eval) are not part of it."""

    source: str  # the file, or the hub dataset's name
    builder: Optional[str] = None  # local files: the datasets builder of their format
    domain: Optional[str] = None
    hub_config: Optional[str] = None
    index: int = 0
    count: int = 1
    skip: int = 0
    is_hub: bool = False

    def rows(self, text_column: str) -> Iterator[dict]:
        """{"text", "domain"} for each text of the shard, in its order."""
        if self.is_hub:
            dataset = load_dataset(self.source, self.hub_config, split="train", streaming=True).shard(self.count,
                                                                                                      self.index)
        else:
            dataset = load_dataset(self.builder, data_files=self.source, split="train", streaming=True)
        column = "text" if self.builder == "text" else text_column  # the text builder's one column is "text"
        rows = iter(dataset)
        for number in itertools.count():
            try:
                row = next(rows)
            except StopIteration:
                return
            except (DatasetGenerationError, UnicodeDecodeError, ValueError) as err:  # a bad line, a bad byte
                if self.is_hub:
                    raise
                raise StreamError(unreadable_reason([self.source], self.builder, err)) from err
            if number >= self.skip:
                yield _text_and_domain(row, column, self.domain, self.source)


class StreamError(ValueError):
    """A streamed file turned out to be unreadable while training ran; the message names it and the fix."""


def _text_and_domain(row: dict, column: str, domain: Optional[str], source: str) -> dict:
    """A stream row: the text, and the entry's domain, else the row's own ``domain`` value (as a string), else None."""
    if column not in row and format_of(list(row)) != TEXT:
        raise StreamError(streamed_records(source, format_of(list(row))))
    if column not in row:
        raise StreamError(f"{source}: no column {column!r}; its columns are {list(row)}. Pass --text_column with the "
                         "one that holds the text.")
    if row[column] is not None and not isinstance(row[column], str):
        raise StreamError(value_problem(row[column], column, source))
    domain = domain if domain is not None else row.get("domain")
    return {"text": row[column], "domain": None if domain is None else str(domain)}


def streamed_records(source: str, kind: str) -> str:
    return (f"{source} holds {kind} records, and --streaming reads text only: drop --streaming to train on "
            "conversations or prompt/completion pairs (docs/data.md#formats)")


def _rows(shards: list[Shard], text_column: str) -> Iterator[dict]:
    """The generator behind the IterableDataset: datasets hands each worker, rank or epoch its list of shards."""
    for shard in shards:
        yield from shard.rows(text_column)


class RankStream:
    """One rank's share of the stream: its texts in a fixed order per epoch."""

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int, seed: int, shuffle_buffer_size: int):
        self.shuffled = shuffle_buffer_size > 0
        if self.shuffled:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size

    def texts(self, epoch: int, start: int = 0) -> Iterator[tuple[Optional[str], Optional[str]]]:
        """(text, domain) of this rank's share of ``epoch``, from its text number ``start`` on (the texts before it
        are read and skipped, not tokenised)."""
        self.dataset.set_epoch(epoch if self.shuffled else 0)  # datasets reorders the shards in every epoch but 0
        for row in islice(iter(self.dataset), start, None):
            yield row["text"], row["domain"]


@dataclass
class TextStream:
    """The whole stream, the same on every rank; ``for_rank`` gives one rank's share."""

    shards: list[Shard]
    text_column: str
    held_out: int  # texts held out for eval from its start

    def dataset(self) -> IterableDataset:
        return IterableDataset.from_generator(_rows, features=FEATURES,
                                              gen_kwargs={"shards": self.shards, "text_column": self.text_column})

    def for_rank(self, rank: int, world_size: int, seed: int, shuffle_buffer_size: int) -> RankStream:
        return RankStream(self.dataset(), rank, world_size, seed, shuffle_buffer_size)

    def describe(self) -> dict:
        return {"shards": len(self.shards), "held_out_texts": self.held_out}


def open_stream(data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[TextStream, Dataset, list[str]]:
    """The training stream, the eval blocks and the run's domain list."""
    files = data_files("train_file", data.train_file) if data.train_file else []
    validation_files = data_files("validation_file", data.validation_file) if data.validation_file else []
    shards = [Shard(f.path, f.builder, f.domain) for f in files] if files else _hub_shards(data)
    validation = _hub_validation(data) if data.dataset_name and not validation_files else None
    held_out = data.streaming_validation_texts if validation is None and not validation_files else 0
    first, shards = _take(shards, held_out, data.text_column)
    if not shards:
        raise ValueError(f"--streaming: the training data holds only {len(first)} texts, all held out for eval "
                         f"(--streaming_validation_texts {data.streaming_validation_texts}); give more data, a "
                         "smaller --streaming_validation_texts or a --validation_file")
    peeked = first or list(islice(shards[0].rows(data.text_column), 1))  # checks the text column early
    domains = _stream_domains(data, files + validation_files, peeked)
    if validation_files:
        eval_texts = load_files(validation_files, data.text_column)
        if format_of(eval_texts.column_names) != TEXT:
            raise ValueError(streamed_records(data.validation_file, format_of(eval_texts.column_names)))
        text_column = data.text_column
    else:
        rows = validation if validation is not None else first[:held_out]
        eval_texts = Dataset.from_dict({"text": [r["text"] for r in rows], "domain": [r["domain"] for r in rows]})
        text_column = "text"
    if not domains and "domain" in eval_texts.column_names:
        eval_texts = eval_texts.remove_columns("domain")
    blocks = pack_blocks(DatasetDict(validation=eval_texts), tokenizer, data.block_size, text_column,
                         num_proc=data.preprocessing_num_workers, domains=domains)["validation"]
    return TextStream(shards, data.text_column, held_out), blocks, domains


def _take(shards: list[Shard], count: int, text_column: str) -> tuple[list[dict], list[Shard]]:
    """The first ``count`` texts of the stream in shard order, and the shards without them (a shard read to its end
    is left out)."""
    taken: list[dict] = []
    rest = []
    for shard in shards:
        if len(taken) == count:
            rest.append(shard)
            continue
        rows = shard.rows(text_column)
        these = list(islice(rows, count - len(taken)))
        taken += these
        if len(taken) < count or next(rows, None) is None:
            continue  # exhausted: nothing left of it to train on
        rest.append(replace(shard, skip=len(these)))
    return taken, rest


def _stream_domains(data: DataConfig, files: list[DataFile], peeked: list[dict]) -> list[str]:
    """--domains, else the per-domain files' names; a domain column alone cannot be listed from a stream."""
    listed = listed_domains(data.domains)
    if listed is not None:
        return listed
    named = file_domains(files)
    if not named and any(row["domain"] is not None for row in peeked):
        raise ValueError("--streaming: the training texts have a `domain` column, whose values a stream cannot list "
                         "before reading all of it; pass them with --domains (such as --domains code,prose), in the "
                         "order that gives their domain_ids")
    return named


def _hub_shards(data: DataConfig) -> list[Shard]:
    try:
        train = load_dataset(data.dataset_name, data.dataset_config_name, split="train", streaming=True)
    except OSError as err:
        raise ValueError(hub_unreachable(data.dataset_name, data.dataset_config_name, err)) from err
    return [Shard(data.dataset_name, hub_config=data.dataset_config_name, index=i, count=train.num_shards, is_hub=True)
            for i in range(train.num_shards)]


def _hub_validation(data: DataConfig) -> Optional[list[dict]]:
    """The first --streaming_validation_texts texts of the hub dataset's validation split, if it has one."""
    try:
        split = load_dataset(data.dataset_name, data.dataset_config_name, split="validation", streaming=True)
    except (ValueError, KeyError):  # no such split
        return None
    source = f"{data.dataset_name} (validation split)"
    return [_text_and_domain(row, data.text_column, None, source)
            for row in islice(split, data.streaming_validation_texts)]
