"""Expert health from the router's decisions, as formulas: load per expert, drops, router entropy, imbalance,
expert similarity (docs/metrics.md has each with its unit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def router_entropy_sum(logits_TE: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the entropy (nats) of each token's router distribution softmax(logits)."""
    log_probs = F.log_softmax(logits_TE.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def routing_metrics(summed: list[float], num_experts: int, top_k: int) -> dict:
    """One layer's logged values from ``RoutingCounters.as_vector`` (moe/counters.py), summed over ranks; {}
    without tokens."""
    E = num_experts
    kept, chosen = [round(v) for v in summed[:E]], [round(v) for v in summed[E:2 * E]]
    entropy_sum, aux_sum, z_sum, tokens, forwards = summed[2 * E:]
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
        "z_loss": z_sum / forwards,
    }


def imbalance(load_E: list[float]) -> float:
    """Busiest expert's load over the mean load: 1.0 is even; E / top_k when every token picks the same experts."""
    return max(load_E) / (sum(load_E) / len(load_E))


def mean_pairwise_cosine(direction_sum_sq: float, num_experts: int) -> float:
    """Mean cosine similarity over expert pairs i < j, from |sum_i w_i / |w_i||^2 = E + 2 sum_{i<j} cos_ij."""
    return (direction_sum_sq - num_experts) / (num_experts * (num_experts - 1))
