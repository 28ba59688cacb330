"""Conversational and prompt/completion records into blocks of --block_size tokens that never mix two sequences.

Each record becomes one sequence of token ids and labels (chat.py). A sequence longer than --block_size is truncated
to its first --block_size tokens or dropped (--overlong_sequences); one left with no token to train on is dropped.
Then, in each map batch of 1000 records:

- packing (--packing, the default): sequences are put whole into blocks, best fit decreasing (the longest first,
  each into the block it leaves the least room in, else a new one); ``position_ids`` restart at 0 with each
  sequence, which is how transformers finds packed sequences and keeps attention within each (masking_utils for
  sdpa and eager, cu_seqlens for flash attention). The free end of a block is padding: pad tokens, label -100,
  positions of a sequence of their own.
- without packing: one sequence per row, padded to --block_size.

Either way a block's ``attention_mask`` is 0 on its padding: the MoE layers route its real tokens only
(moe/padding.py), and a padded row's forward takes it (a packed one's does not: transformers looks for packed
sequences in the position ids only without a mask).

The first token of every sequence gets label -100: it is never a target of its own sequence, and in a packed block it
would otherwise be a target of the sequence before it.
"""

from __future__ import annotations

import itertools
import json
from functools import partial
from typing import Optional

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..run.config import DataConfig
from .chat import IGNORE, chat_template, needs_template, token_labels
from .domains import domain_index
from .formats import RECORD, SOURCE, format_columns, format_of, record_problem


def sequence_blocks(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
                    domains: list[str]) -> tuple[DatasetDict, dict]:
    """The blocks of every split, and per split what became of its sequences: {"sequences", "overlong",
    "untrained", "blocks"} (``overlong``: truncated or dropped as --overlong_sequences says; ``untrained``: left
    with no token to train on, dropped)."""
    kind = format_of(raw["train"].column_names)
    template = chat_template(tokenizer, data.chat_template)
    first = raw["train"][0]
    if template is None and needs_template(_record(first, format_columns(kind))):
        source = first[SOURCE]
        raise ValueError(f"{source} holds conversations ({kind}), and the tokenizer has no chat template to render "
                         "them: pass --chat_template FILE (a Jinja template), or a --tokenizer_name whose tokenizer "
                         "has one")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token, which fills the rows and block ends; give it one")
    index = domain_index(domains)
    blocks, counts = {}, {}
    for split, dataset in raw.items():
        sequences = dataset.map(partial(_sequences, kind=kind, tokenizer=tokenizer, template=template, index=index,
                                        data=data), batched=True, remove_columns=dataset.column_names,
                                num_proc=data.preprocessing_num_workers, desc=f"Tokenizing {split}")
        counts[split] = {"sequences": len(sequences), "overlong": _count(sequences, "overlong"),
                         "untrained": _count(sequences, "untrained")}
        blocks[split] = sequences.map(partial(_blocks, block_size=data.block_size, pad=tokenizer.pad_token_id,
                                              packing=data.packing, drop_overlong=data.overlong_sequences == "drop"),
                                      batched=True, remove_columns=sequences.column_names,
                                      num_proc=data.preprocessing_num_workers,
                                      desc=f"{'Packing' if data.packing else 'Padding'} {split}")
        counts[split]["blocks"] = len(blocks[split])
        if len(blocks[split]) == 0:
            raise ValueError(f"the {split} split gives no block: of its {len(sequences)} sequences, "
                             f"{counts[split]['untrained']} have no token to train on within --block_size "
                             f"{data.block_size} and {counts[split]['overlong']} are longer than it "
                             f"(--overlong_sequences {data.overlong_sequences})")
    return DatasetDict(blocks), counts


def sequences_note(counts: dict, data: DataConfig) -> Optional[str]:
    """What the run says about sequences that did not fit or had nothing to train on (None when all did)."""
    parts = []
    for split, count in counts.items():
        done = "truncated" if data.overlong_sequences == "truncate" else "dropped"
        if count["overlong"]:
            parts.append(f"{split}: {count['overlong']} of {count['sequences']} sequences are longer than "
                         f"--block_size {data.block_size} and were {done} (--overlong_sequences)")
        if count["untrained"]:
            parts.append(f"{split}: {count['untrained']} sequences have no token to train on within the block and "
                         "were dropped")
    return "; ".join(parts) or None


def _count(dataset: Dataset, column: str) -> int:
    return int(pc.sum(dataset.data.column(column)).as_py() or 0)


def _record(row: dict, columns: list[str]) -> dict:
    """A record as its file holds it (text.py keeps the format's columns as JSON text)."""
    return {column: json.loads(row[column]) for column in columns}


def _sequences(batch: dict, kind: str, tokenizer: PreTrainedTokenizerBase, template: Optional[str],
               index: dict[str, int], data: DataConfig) -> dict[str, list]:
    """Each record's ids and labels (cut to --block_size when truncating), whether it was too long, and whether it has
    no target left; with a ``domain`` column, each token's domain index."""
    out = {"input_ids": [], "labels": [], "overlong": [], "untrained": []}
    columns = format_columns(kind)
    for row in range(len(batch[SOURCE])):
        record = _record({column: batch[column][row] for column in columns}, columns)
        problem = record_problem(record, kind)
        try:
            if problem:
                raise ValueError(f"{problem}; fix or remove that record")
            ids, labels = token_labels(record, tokenizer, template, data.loss_on_all_tokens)
        except ValueError as err:
            raise ValueError(f"{batch[SOURCE][row]} record {batch[RECORD][row]}: {err}") from None
        overlong = len(ids) > data.block_size
        if overlong and data.overlong_sequences == "truncate":
            ids, labels = ids[:data.block_size], labels[:data.block_size]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["overlong"].append(overlong)
        out["untrained"].append(all(label == IGNORE for label in labels[1:]) and not (
            overlong and data.overlong_sequences == "drop"))
    if "domain" in batch:
        out["domain_ids"] = [[index.get(str(domain), -1) if domain is not None else -1] * len(ids)
                             for domain, ids in zip(batch["domain"], out["input_ids"])]
    return out


def best_fit_decreasing(rows: list[int], lengths: list[int], block_size: int) -> list[list[int]]:
    """``rows`` (each at most ``block_size`` long) in blocks: longest first, each into the block it leaves the least
    room in, else a new one. Blocks in the order they were opened; within a block, longest first."""
    groups, free = [], []
    for row in sorted(rows, key=lambda row: (-lengths[row], row)):
        fitting = [block for block, room in enumerate(free) if room >= lengths[row]]
        if fitting:
            block = min(fitting, key=lambda block: (free[block], block))
            groups[block].append(row)
            free[block] -= lengths[row]
        else:
            groups.append([row])
            free.append(block_size - lengths[row])
    return groups


def _blocks(batch: dict, block_size: int, pad: int, packing: bool, drop_overlong: bool) -> dict[str, list]:
    """Packed or padded blocks of the batch's sequences that fit and have a target."""
    kept = [row for row in range(len(batch["input_ids"]))
            if not batch["untrained"][row] and not (drop_overlong and batch["overlong"][row])]
    lengths = [len(ids) for ids in batch["input_ids"]]
    groups = best_fit_decreasing(kept, lengths, block_size) if packing else [[row] for row in kept]
    out = {"input_ids": [], "labels": [], "attention_mask": [], **({"position_ids": []} if packing else {})}
    if "domain_ids" in batch:
        out["domain_ids"] = []
    for group in groups:
        free = block_size - sum(len(batch["input_ids"][row]) for row in group)
        out["input_ids"].append(list(itertools.chain(*(batch["input_ids"][row] for row in group))) + [pad] * free)
        out["labels"].append(list(itertools.chain(*([IGNORE] + batch["labels"][row][1:] for row in group)))
                             + [IGNORE] * free)
        if packing:
            out["position_ids"].append(list(itertools.chain(*(range(len(batch["input_ids"][row])) for row in group),
                                                            range(free))))
        out["attention_mask"].append([1] * (block_size - free) + [0] * free)
        if "domain_ids" in batch:
            out["domain_ids"].append(list(itertools.chain(*(batch["domain_ids"][row] for row in group)))
                                     + [-1] * free)
    return out
