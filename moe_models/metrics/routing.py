"""Expert health from the router's decisions, as formulas: load per expert, drops, router entropy, imbalance,
effective experts, router-logit norm, expert similarity (docs/metrics.md has each with its unit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .specialisation import entropy_bits
from .throughput import expert_flops_per_token


def router_entropy_sum(logits_TE: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the entropy (nats) of each token's router distribution softmax(logits)."""
    log_probs = F.log_softmax(logits_TE.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum()


def router_logit_norm_sum(logits_TE: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the L2 norm of each token's router logits (fp32)."""
    return torch.linalg.vector_norm(logits_TE.float(), dim=-1).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def max_violation(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing", arXiv 2408.15664, eq. 9): the busiest
    expert's load over the mean load, minus one; 0 is even. On the device (float64), no host read."""
    load_E = load_E.double()
    return load_E.max() / load_E.mean().clamp_min(torch.finfo(torch.float64).tiny) - 1


def routing_metrics(sums, num_experts: int, top_k: int) -> dict:
    """One layer's logged values from its ``RoutingSums`` (moe/counters.py) summed over ranks; {} without tokens."""
    tokens = round(float(sums.tokens))
    if tokens == 0:
        return {}
    kept, chosen = [round(v) for v in sums.kept_E.tolist()], [round(v) for v in sums.chosen_E.tolist()]
    routes = tokens * top_k
    dropped = sum(chosen) - sum(kept)  # by capacity (routes to null experts and past top-p's cut are not chosen)
    forwards = float(sums.forwards)
    last_step = sums.last_step_E.tolist()  # the interval's last optimizer step, for max_violation_step
    return {
        "tokens_per_expert": kept,
        "routed_per_expert": chosen,
        "routed_tokens": tokens,
        "dropped": dropped,
        "drop_fraction": dropped / max(sum(chosen), 1),
        "router_entropy": float(sums.router_entropy) / float(sums.tokens),
        "imbalance": imbalance(chosen),
        "effective_experts": effective_experts(chosen),
        "aux_loss": float(sums.balance_loss) / forwards,
        "z_loss": float(sums.z_loss) / forwards,
        "router_logit_norm": float(sums.router_logit_norm) / float(sums.tokens),
        "max_violation_micro_batch": float(sums.max_violation) / forwards,
        **({"max_violation_step": imbalance(last_step) - 1} if sum(last_step) > 0 else {}),
        **real_experts_metrics(sums.real_per_token_K1.tolist(), float(sums.null_routes), routes),
    }


def real_experts_metrics(tokens_by_real_k: list[float], null_routes: float, routes: int) -> dict:
    """How many real experts the tokens ran (routes to null experts, cut by top-p or dropped by capacity run none):
    the mean per token, the histogram (tokens with 0, 1, ..., top_k real experts) and the share of the routes
    chosen to null experts."""
    hist = [round(v) for v in tokens_by_real_k]
    return {"real_experts_per_token": sum(k * n for k, n in enumerate(hist)) / max(sum(hist), 1),
            "real_experts_histogram": hist, "null_route_share": null_routes / routes}


def domain_real_experts_metrics(routes_N: list[float], tokens_N: list[float], domains: list[str],
                                expert_params: int) -> dict:
    """One MoE layer's real compute per domain at eval: for each domain d with eval tokens,
    ``real_experts_per_token/{d}`` = its real routes (routes not marked -1; ``domain_expert_counts`` summed over the
    experts) / its tokens, and ``real_expert_flops_per_token/{d}`` = 6 x ``expert_params`` x that."""
    row = {}
    for name, routes, tokens in zip(domains, routes_N, tokens_N):
        if tokens > 0:
            row[f"real_experts_per_token/{name}"] = routes / tokens
            row[f"real_expert_flops_per_token/{name}"] = expert_flops_per_token(expert_params, routes / tokens)
    return row


def imbalance(load_E: list[float]) -> float:
    """Busiest expert's load over the mean load: 1.0 is even; E / top_k when every token picks the same experts."""
    return max(load_E) / (sum(load_E) / len(load_E))


def effective_experts(load_E: list[float]) -> float:
    """exp(entropy of the load shares in nats) = 2^(entropy in bits), the perplexity of the load: E when even, top_k
    when every token picks the same experts."""
    return 2.0 ** entropy_bits(load_E)


def mean_pairwise_cosine(direction_sum_sq: float, num_experts: int) -> float:
    """Mean cosine similarity over expert pairs i < j, from |sum_i w_i / |w_i||^2 = E + 2 sum_{i<j} cos_ij."""
    return (direction_sum_sq - num_experts) / (num_experts * (num_experts - 1))


def shared_share_sum(routed_TD: torch.Tensor, shared_TD: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of |shared| / (|shared| + |routed|), L2 norms of each token's shared-expert and routed-expert
    outputs in fp32 (a token with both zero counts 0)."""
    shared_T = torch.linalg.vector_norm(shared_TD.float(), dim=-1)
    routed_T = torch.linalg.vector_norm(routed_TD.float(), dim=-1)
    return (shared_T / (shared_T + routed_T).clamp_min(torch.finfo(torch.float32).tiny)).sum()


def shared_expert_metrics(sums, gated: bool) -> dict:
    """One layer's shared-expert values from its ``SharedSums`` (moe/shared.py) summed over ranks; {} without
    tokens."""
    tokens = float(sums.tokens)
    if tokens == 0:
        return {}
    share = {"shared_share": float(sums.shared_share) / tokens}
    return {**share, "shared_gate": float(sums.gate) / tokens} if gated else share
