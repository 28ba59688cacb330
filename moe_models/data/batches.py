"""Batches per data-parallel rank: an endless, resumable training stream and the eval batches."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler

BLOCK_COLUMNS = ("input_ids", "labels", "position_ids", "attention_mask", "domain_ids")
MODEL_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask")  # what the forward takes of a batch


def _as_tensors(dataset: Dataset) -> Dataset:
    """The block columns as int64 torch tensors, so the default collate stacks them into [B, T]."""
    columns = [c for c in BLOCK_COLUMNS if c in dataset.column_names]
    return dataset.with_format("torch", columns=columns)


def model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The forward's arguments of a batch, on ``device``: its input ids, its labels (the input ids themselves for
    text blocks, where every token is a target) and, for conversational data, its position ids (packed) or attention
    mask (padded; a packed block's mask, 0 on its free end, is for the MoE layers alone: ``MoELayers.ignore_padding``).
    Packed blocks run without a KV cache: transformers looks for packed sequences in the position ids only when there
    is none (masking_utils), and a forward makes one by default (the config's use_cache)."""
    inputs = {name: batch[name].to(device) for name in MODEL_INPUTS if name in batch}
    inputs.setdefault("labels", inputs["input_ids"])
    return packed_forward(inputs)


def packed_forward(inputs: dict) -> dict:
    """A packed batch's (one with position ids) forward arguments: without its attention mask, which is the MoE
    layers' alone (moe/padding.py; with it transformers would not look for the packed sequences), and without a KV
    cache. Other batches as they are."""
    if "position_ids" not in inputs:
        return inputs
    return {**{name: value for name, value in inputs.items() if name != "attention_mask"}, "use_cache": False}


def target_count(labels_BT: torch.Tensor) -> torch.Tensor:
    """How many tokens the next-token loss of a batch is on (transformers shifts the labels; -100 is skipped)."""
    return (labels_BT[:, 1:] != -100).sum()


def _loader(dataset: Dataset, batch_size: int, indices: list[int], drop_last: bool) -> DataLoader:
    """Batches of ``dataset[indices]`` in that order, in this process."""
    # An explicit generator: a DataLoader otherwise draws its base seed from the global torch RNG on every
    # iter(), which would shift model-side randomness (init, dropout, gate noise) depending on data reads.
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, drop_last=drop_last, num_workers=0,
                      generator=torch.Generator())


class TrainBatches:
    """Endless ``{"input_ids": LongTensor[B, T]}`` batches (plus "labels", "position_ids" or "attention_mask" and
    "domain_ids" when the blocks have them) for one rank.

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
        self.rank, self.world_size = rank, world_size
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
        if "batches_in_epoch" not in state:
            raise ValueError(f"the saved data position {state} is of a run with --streaming; resume it with "
                             "--streaming (a run cannot switch between the two in the middle)")
        if not 0 <= state["batches_in_epoch"] <= self.batches_per_epoch:
            raise ValueError(f"saved data position {state} does not fit this run's {self.batches_per_epoch} "
                             "batches per epoch; resume with the same data, batch size and number of ranks")
        self.epoch, self.batches_in_epoch, self._batches = state["epoch"], state["batches_in_epoch"], None

    def resume(self, saved: Callable[[int], dict], saved_world: int) -> None:
        """Continue from a checkpoint: ``saved(r)`` is the ``state_dict()`` of saving rank r (all ranks' are the
        same). At the same number of ranks, exactly; at another, the same epoch and the same fraction of it (each rank
        reads a different stride of the epoch's order at another size)."""
        state = saved(0)
        if saved_world != self.world_size and "batches_in_epoch" in state:
            state = {"epoch": state["epoch"],
                     "batches_in_epoch": state["batches_in_epoch"] * saved_world // self.world_size}
        self.load_state_dict(state)


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
