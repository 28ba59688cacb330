"""The data a run trains and evaluates on, ready for batching: packed blocks (cached by content) or, with
--streaming, each rank's stream; the eval blocks; the run's domain list. train.py prepares it on rank 0 first (the
other ranks then find the cache)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..run.config import DataConfig
from ..run.writes import writable_problem
from .batches import TrainBatches
from .cache import cache_root, cached_blocks, code_digest, file_digest, text_digest, tokenizer_digest
from .domains import file_domains, listed_domains, resolve_domains
from .file_specs import DataFile, data_files
from .formats import TEXT, format_of
from .sequences import sequence_blocks, sequences_note
from .stream import TextStream, open_stream
from .stream_batches import StreamBatches
from .synthetic import synthetic_domains
from .text import load_text_datasets, pack_blocks


@dataclass
class PreparedData:
    validation: Dataset  # eval blocks
    domains: list[str]
    train: Union[Dataset, TextStream]  # blocks, or the texts to stream
    settings: DataConfig
    tokenizer: PreTrainedTokenizerBase
    cache: dict = field(default_factory=dict)  # where the blocks came from: {"entry": folder, "hit": bool}
    sequences: Optional[dict] = None  # conversational data: per split, what became of its sequences (sequences.py)

    def train_batches(self, batch_size: int, rank: int, world_size: int, seed: int
                      ) -> Union[TrainBatches, StreamBatches]:
        """This rank's endless, resumable training batches."""
        if isinstance(self.train, TextStream):
            stream = self.train.for_rank(rank, world_size, seed, self.settings.shuffle_buffer_size)
            return StreamBatches(stream, self.tokenizer, self.settings.block_size, batch_size, self.domains)
        return TrainBatches(self.train, batch_size, rank, world_size, seed=seed)

    def note(self) -> Optional[str]:
        """What the run says about conversations that did not fit its blocks (None when all did)."""
        return sequences_note(self.sequences or {}, self.settings)

    def resolved(self) -> dict:
        """What run_config.json records under ``resolved``."""
        streamed = isinstance(self.train, TextStream)
        return {"domains": self.domains, "train_blocks": None if streamed else len(self.train),
                "train_stream": self.train.describe() if streamed else None,
                "validation_blocks": len(self.validation), "data_cache": self.cache or None,
                "sequences": self.sequences}


def cache_problems(data: DataConfig) -> list[str]:
    """The block cache must be writable before anything is built (streams and hub datasets do not use it)."""
    if data.streaming or data.dataset_name:
        return []
    problem = writable_problem(cache_root(data.data_cache_dir), "--data_cache_dir")
    return [problem] if problem else []


def prepare_data(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    if data.streaming:
        stream, validation, domains = open_stream(data, tokenizer)
        return PreparedData(validation, domains, stream, data, tokenizer)
    parts = blocks_key(data, tokenizer, seed)
    if parts is None:  # a hub dataset: datasets' own cache keys it by its revision
        blocks, meta = _build_blocks(data, tokenizer, seed)
        cache = {}
    else:
        blocks, meta, entry, hit = cached_blocks(cache_root(data.data_cache_dir), parts,
                                                 lambda: _build_blocks(data, tokenizer, seed))
        cache = {"entry": str(entry), "hit": hit}
    return PreparedData(blocks["validation"], meta["domains"], blocks["train"], data, tokenizer, cache,
                        meta.get("sequences"))


def _build_blocks(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[DatasetDict, dict]:
    raw = load_text_datasets(data, seed)
    domains = map_style_domains(data, raw)
    if format_of(raw["train"].column_names) != TEXT:
        blocks, counts = sequence_blocks(raw, tokenizer, data, domains)
        return blocks, {"domains": domains, "sequences": counts}
    blocks = pack_blocks(raw, tokenizer, data.block_size, data.text_column,
                         num_proc=data.preprocessing_num_workers, domains=domains)
    return blocks, {"domains": domains}


def map_style_domains(data: DataConfig, raw: DatasetDict) -> list[str]:
    """The run's domain list (domains.py): --domains, the built-in corpus's, or the files' names and column values."""
    listed = listed_domains(data.domains)
    if listed is None and not (data.train_file or data.dataset_name):
        listed = list(synthetic_domains(data.synthetic_domains))
    values = [value for split in raw.values() if "domain" in split.column_names for value in split.unique("domain")]
    return resolve_domains(listed, file_domains(_files(data)), values)


def _files(data: DataConfig) -> list[DataFile]:
    return [file for flag in ("train_file", "validation_file") if getattr(data, flag)
            for file in data_files(flag, getattr(data, flag))]


def blocks_key(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> Optional[dict]:
    """What the blocks of a map-style run depend on (cache.py), or None for a hub dataset (not cached here)."""
    if data.dataset_name:
        return None

    def described(flag: str) -> list[dict]:
        return [{"sha256": file_digest(file.path), "format": file.builder, "domain": file.domain}
                for file in data_files(flag, getattr(data, flag))]

    train = described("train_file") if data.train_file else {"synthetic_examples": data.synthetic_examples,
                                                              "synthetic_domains": data.synthetic_domains,
                                                              "seed": seed}
    validation = (described("validation_file") if data.validation_file
                  else {"held_out_percent": data.validation_split_percentage, "seed": seed})
    return {"train": train, "validation": validation, "text_column": data.text_column, "block_size": data.block_size,
            "domains": data.domains, "num_proc": data.preprocessing_num_workers,
            "chat_template": text_digest(data.chat_template), "loss_on_all_tokens": data.loss_on_all_tokens,
            "packing": data.packing, "overlong_sequences": data.overlong_sequences,
            "tokenizer": tokenizer_digest(tokenizer), "code": code_digest()}
