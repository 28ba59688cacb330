"""Batches from one rank's stream (--streaming): texts tokenised and packed into blocks as they are read, with a
position that makes resume exact.

The blocks of an epoch are cut from the concatenation of the rank's texts of that epoch, each followed by eos; the
tokens after the epoch's last full block are dropped. The position of the next batch is (epoch, text, offset): its
first token is token ``offset`` of this rank's text number ``text`` of that epoch. Resuming reads the epoch's texts
up to that one again (without tokenising them), so the next batch is the one the uninterrupted run would have read.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Callable, Iterator, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .domains import domain_index
from .stream import RankStream
from .text import tokenize_texts

TOKENIZE_CHUNK = 64  # texts per tokenizer call
Block = tuple[list[int], list[int], tuple[int, int]]  # token ids, domain ids, (text, offset) of the token after it


def pack(token_lists: Iterator[tuple[list[int], int]], block_size: int, text: int = 0, offset: int = 0
         ) -> Iterator[Block]:
    """Blocks of ``block_size`` tokens cut from the texts' tokens, concatenated. ``token_lists`` gives each text's
    ids and domain id, from text number ``text`` on, whose first ``offset`` tokens are skipped."""
    ids_buffer: list[int] = []
    domain_buffer: list[int] = []
    start = 0  # the buffers' first token not yet in a block
    lengths: deque[int] = deque()  # per buffered text, its tokens not yet in a block
    for number, (ids, domain) in enumerate(token_lists):
        if number == 0:
            ids = ids[offset:]
        ids_buffer += ids
        domain_buffer += [domain] * len(ids)
        lengths.append(len(ids))
        while len(ids_buffer) - start >= block_size:
            end = start + block_size
            left = block_size
            while left:  # move the position over the block's tokens
                used = min(left, lengths[0])
                lengths[0] -= used
                left -= used
                offset += used
                if lengths[0] == 0:
                    lengths.popleft()
                    text, offset = text + 1, 0
            yield ids_buffer[start:end], domain_buffer[start:end], (text, offset)
            start = end
        if start * 2 > len(ids_buffer):  # drop what is already in blocks
            del ids_buffer[:start], domain_buffer[:start]
            start = 0


class StreamBatches:
    """Endless ``{"input_ids": LongTensor[B, T]}`` batches (plus "domain_ids" when the run has domains) for one
    rank; ``state_dict``/``load_state_dict`` resume exactly where a run stopped."""

    def __init__(self, stream: RankStream, tokenizer: PreTrainedTokenizerBase, block_size: int, batch_size: int,
                 domains: Sequence[str]):
        self.stream, self.tokenizer = stream, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.index = domain_index(domains)
        self.with_domains = bool(domains)
        self.rank, self.world_size = stream.rank, stream.world_size
        self.epoch, self.text, self.offset = 0, 0, 0
        self._blocks: Optional[Iterator[Block]] = None
        self._from_epoch_start = True  # whether the blocks being read started at the epoch's first token

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        ids, domains = [], []
        while len(ids) < self.batch_size:
            if self._blocks is None:
                self._blocks = pack(self._tokenized(self.stream.texts(self.epoch, self.text)), self.block_size,
                                    self.text, self.offset)
                self._from_epoch_start = (self.text, self.offset) == (0, 0)
            block = next(self._blocks, None)
            if block is None:  # the epoch is read: the next one reshuffles
                if self._from_epoch_start:
                    raise ValueError(f"rank {self.rank} of {self.world_size}: its share of the stream gives no block "
                                     f"of {self.block_size} tokens in epoch {self.epoch}. Give more data (at least as "
                                     "many files as ranks) or use a smaller --block_size.")
                self.epoch, self.text, self.offset, self._blocks = self.epoch + 1, 0, 0, None
                continue
            self._from_epoch_start = False
            ids.append(block[0])
            domains.append(block[1])
            self.text, self.offset = block[2]
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if self.with_domains:
            batch["domain_ids"] = torch.tensor(domains, dtype=torch.long)
        return batch

    def _tokenized(self, texts: Iterator[tuple[Optional[str], Optional[str]]]) -> Iterator[tuple[list[int], int]]:
        """Each text's ids (eos at the end) and its domain id, tokenised a chunk at a time."""
        while chunk := list(islice(texts, TOKENIZE_CHUNK)):
            ids = tokenize_texts([text for text, _ in chunk], self.tokenizer)
            yield from zip(ids, (-1 if domain is None else self.index.get(domain, -1) for _, domain in chunk))

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch in this rank's stream."""
        return {"epoch": self.epoch, "text": self.text, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a ``state_dict()`` of this rank: the next batch is the one the saved run would have read."""
        if "text" not in state:
            raise ValueError(f"the saved data position {state} is of a run without --streaming; resume it without "
                             "--streaming (a run cannot switch between the two in the middle)")
        self.epoch, self.text, self.offset, self._blocks = state["epoch"], state["text"], state["offset"], None

    def resume(self, saved: Callable[[int], dict], saved_world: int) -> None:
        """Continue from a checkpoint: ``saved(r)`` is the ``state_dict()`` of saving rank r. At the same number of
        ranks, exactly. At another, approximately: every rank starts in the lowest epoch a saving rank was in, past an
        equal part of the texts the saving ranks had read of it (exact when every rank kept every N-th text; with
        whole files per rank, some texts are read twice and others skipped in that epoch)."""
        if saved_world == self.world_size:
            self.load_state_dict(saved(self.rank))
            return
        states = [saved(rank) for rank in range(saved_world)]
        for state in states:
            self.load_state_dict(state)  # refuses a position of a run without --streaming
        epoch = min(state["epoch"] for state in states)
        read = sum(state["text"] for state in states if state["epoch"] == epoch)
        self.load_state_dict({"epoch": epoch, "text": read // self.world_size, "offset": 0})
