"""What a logging interval measured beside the losses, over all ranks: expert routing, energy, memory.

The routing counters of every MoE layer and the GPU energy are one flat float64 vector that the
trainer sums over ranks together with its loss sums (one all-reduce per interval); peak memory
takes one max-reduce.
"""

from __future__ import annotations

from functools import partial

import torch

from ..distributed import all_reduce_max
from .device import EnergyMeter, memory_gib
from .routing import mean_pairwise_cosine, routing_metrics, shared_expert_metrics


class IntervalStats:
    """The MoE layers' routing counters (and shared-expert counters, where a layer has shared experts) and this
    rank's GPU energy meter (None off NVIDIA GPUs)."""

    def __init__(self, layers: list, device: torch.device):
        self.layers = layers  # MoEFeedForward layers, in model order
        self.device = device
        self.energy = EnergyMeter.for_device(device)

    def vector(self) -> torch.Tensor:
        """Every layer's routing counters, the shared-expert counters, then [joules, 1 if this rank measured energy
        else 0]."""
        energy = [self.energy.joules_since_last(), 1.0] if self.energy else [0.0, 0.0]
        parts = [counter.as_vector(self.device) for _, counter, _ in self.counters()]
        return torch.cat([*parts, torch.tensor(energy, dtype=torch.float64, device=self.device)])

    def metrics(self, summed: list[float], tokens: float, world_size: int) -> dict:
        """Row entries from `vector` summed over ranks; resets the counters. ``tokens``: the interval's, all ranks."""
        row = {}
        offset = 0
        for i, counter, metrics_of in self.counters():
            values = summed[offset:offset + counter.vector_size]
            offset += counter.vector_size
            row.update({f"moe/layer_{i}/{key}": value for key, value in metrics_of(values).items()})
            counter.reset()
        for i, layer in enumerate(self.layers):
            if layer.gate.score_bias is not None:  # aux-loss-free balancing: the same on every rank
                row[f"moe/layer_{i}/score_bias"] = layer.gate.score_bias.tolist()
        joules, ranks_measured = summed[offset:offset + 2]
        if ranks_measured == world_size:  # energy of every GPU, or none reported
            row.update(energy_j=joules, joules_per_token=joules / tokens)
        memory = memory_gib(self.device)
        peaks = all_reduce_max(torch.tensor(list(memory.values()), dtype=torch.float64, device=self.device))
        row.update(zip(memory, peaks.tolist()))
        return row

    def counters(self) -> list[tuple]:
        """(MoE layer index, counters, summed values -> that layer's row entries), in the order of ``vector``."""
        routing = [(i, layer.routing, partial(routing_metrics, num_experts=layer.num_experts, top_k=layer.top_k))
                   for i, layer in enumerate(self.layers)]
        shared = [(i, layer.shared_counters, partial(shared_expert_metrics, gated=layer.shared_expert_gate is not None))
                  for i, layer in enumerate(self.layers) if layer.shared_counters is not None]
        return routing + shared


def expert_similarity_metrics(layers: list) -> dict:
    """``moe/layer_{i}/expert_similarity``: mean pairwise cosine of the experts' weights, per layer with 2+ experts.

    Every rank must call it (with ep_size > 1 it all-reduces over the expert-parallel group).
    """
    return {f"moe/layer_{i}/expert_similarity":
            mean_pairwise_cosine(layer.expert_direction_sum_sq(), layer.num_experts)
            for i, layer in enumerate(layers) if layer.num_experts > 1}
