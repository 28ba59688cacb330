"""Expert health from the router's decisions: load per expert, routes dropped by capacity, router entropy.

`RoutingCounters` adds every training forward of one MoE layer to sums kept on the device (no host
sync); they are summed over ranks and read once per logging interval, then `routing_metrics` turns
the sums into the logged values. Formulas and units: docs/metrics.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kept_routes_per_expert(indices_KS: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes each expert processed: ``indices_KS[k, s]`` is the expert of token s's k-th route, -1 if dropped.

    index_add_ rather than torch.bincount: on CUDA bincount reads the largest index back to the host.
    """
    slots = torch.where(indices_KS >= 0, indices_KS, num_experts).long().flatten()  # dropped -> a spare slot
    counts = torch.zeros(num_experts + 1, dtype=torch.float64, device=indices_KS.device)
    counts.index_add_(0, slots, torch.ones_like(slots, dtype=torch.float64))
    return counts[:num_experts]


def router_entropy_sum(logits_SE: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the entropy (nats) of each token's router distribution softmax(logits)."""
    log_probs = F.log_softmax(logits_SE.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum()


class RoutingCounters:
    """On-device sums of one MoE layer's routing over the training forwards of a logging interval.

    ``values`` holds [kept routes per expert (E), routes chosen per expert before capacity (E),
    router entropy summed over tokens, balance loss summed over forwards]; the token and forward
    counts are known from shapes, so they stay on the host. ``enabled = False`` stops counting.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.enabled = True
        self.values: torch.Tensor | None = None
        self.tokens = 0
        self.forwards = 0

    def add(self, indices_KS: torch.Tensor, chosen_E: torch.Tensor, logits_SE: torch.Tensor,
            aux_loss: torch.Tensor) -> None:
        E = self.num_experts
        if self.values is None:
            self.values = torch.zeros(2 * E + 2, dtype=torch.float64, device=indices_KS.device)
        self.values[:E] += kept_routes_per_expert(indices_KS, E)
        self.values[E:2 * E] += chosen_E
        self.values[2 * E] += router_entropy_sum(logits_SE)
        self.values[2 * E + 1] += aux_loss.detach()
        self.tokens += indices_KS.shape[1]
        self.forwards += 1

    def as_vector(self, device: torch.device) -> torch.Tensor:
        """The sums followed by the token and forward counts (zeros before the first forward)."""
        values = self.values if self.values is not None else torch.zeros(2 * self.num_experts + 2,
                                                                          dtype=torch.float64, device=device)
        counts = torch.tensor([self.tokens, self.forwards], dtype=torch.float64, device=values.device)
        return torch.cat([values, counts])

    @property
    def vector_size(self) -> int:
        return 2 * self.num_experts + 4

    def reset(self) -> None:
        if self.values is not None:
            self.values.zero_()
        self.tokens = self.forwards = 0


def routing_metrics(summed: list[float], num_experts: int, top_k: int) -> dict:
    """One layer's logged values from `RoutingCounters.as_vector`, summed over ranks; {} without tokens."""
    E = num_experts
    kept, chosen = [round(v) for v in summed[:E]], [round(v) for v in summed[E:2 * E]]
    entropy_sum, aux_sum, tokens, forwards = summed[2 * E:]
    if tokens == 0:
        return {}
    routes = round(tokens) * top_k
    dropped = routes - sum(kept)
    return {
        "tokens_per_expert": kept,
        "routed_per_expert": chosen,
        "routed_tokens": round(tokens),
        "dropped": dropped,
        "drop_fraction": dropped / routes,
        "router_entropy": entropy_sum / tokens,
        "imbalance": imbalance(chosen),
        "aux_loss": aux_sum / forwards,
    }


def imbalance(load_E: list[float]) -> float:
    """Busiest expert's load over the mean load: 1.0 is even; E / top_k when every token picks the same experts."""
    return max(load_E) / (sum(load_E) / len(load_E))


def mean_pairwise_cosine(direction_sum_sq: float, num_experts: int) -> float:
    """Mean cosine similarity over expert pairs i < j, from |sum_i w_i / |w_i||^2 = E + 2 sum_{i<j} cos_ij."""
    return (direction_sum_sq - num_experts) / (num_experts * (num_experts - 1))
