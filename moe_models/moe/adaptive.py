"""Adaptive compute in the scored router: a token decides how many real experts it runs (docs/routing.md).

  - top-p (dynamic-k) routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
    arXiv 2403.07652): the fewest experts, by descending score, whose probabilities sum to >= p, between min_k and
    top_k; routes past the cut are marked -1 (not dispatched, no compute);
  - null (zero-computation) experts (MoE++, Jin et al. 2024, arXiv 2410.07348; LongCat-Flash, arXiv 2509.01322):
    router outputs E .. E + N - 1 whose expert output is zero; a route to one is marked -1 after its weight took its
    part in the rescaling, so it costs nothing and adds nothing;
  - the compute-target controller (LongCat-Flash): the aux-loss-free bias update (moe/balance.py) with a target
    share of the routes per real and per null expert, so the mean number of real experts per token tracks a target.

Everything is on the device (no host read). Shape letters: moe/__init__.py.
"""

from __future__ import annotations

from typing import Optional

import torch


def top_p_choice(choice_TE: torch.Tensor, probs_TE: torch.Tensor, max_k: int, min_k: int, p: float) -> torch.Tensor:
    """[T, max_k] expert ids, -1 past each token's cut. Experts in descending ``choice_TE`` (ties: the lower id
    first, a stable sort); expert j of that order (0-based) is kept when j < min_k or when the probabilities
    (``probs_TE``) of the experts before it sum to < p: the fewest experts whose probabilities reach p, at most
    max_k."""
    order_TE = torch.sort(choice_TE, dim=1, descending=True, stable=True).indices
    ids_TK = order_TE[:, :max_k]
    before_TK = probs_TE.gather(1, ids_TK).cumsum(dim=1) - probs_TE.gather(1, ids_TK)
    position_K = torch.arange(max_k, device=ids_TK.device)
    keep_TK = (position_K < min_k) | (before_TK < p)
    return torch.where(keep_TK, ids_TK, -1)


def without_null_routes(ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                        num_real: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes to null experts (ids >= ``num_real``) marked -1 with weight 0: their output is zero, so they are not
    dispatched; their weight already took its part in the rescaling of the token's weights."""
    null_TK = ids_TK >= num_real
    return torch.where(null_TK, -1, ids_TK), torch.where(null_TK, 0.0, weights_TK)


def dynamic_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Huang et al.'s dynamic loss (eq. 6): the mean over tokens of the entropy -sum_e P_e log P_e (nats) of the
    router's softmax distribution P (over every router output, null experts included)."""
    log_probs_TE = torch.log_softmax(logits_TE.float(), dim=-1)
    return -(log_probs_TE.exp() * log_probs_TE).sum(dim=-1).mean()


def bias_gap(load_E: torch.Tensor, num_real: int, top_k: int, target_real_k: Optional[float]) -> torch.Tensor:
    """What the aux-loss-free update moves each bias toward (its sign): target load - load per router output.

    No null experts: every expert's target is the mean load (DeepSeek-V3). Null experts without a target: the real
    experts' target is their mean load and the null experts' gap is 0 (their bias stays). With ``target_real_k``
    K_t: of all R routes of the step, a real expert's target is R K_t / (top_k E), a null expert's
    R (1 - K_t / top_k) / N, so the routes to real experts average K_t per token (LongCat-Flash's controller)."""
    num_null = load_E.numel() - num_real
    real_E, null_N = load_E[:num_real], load_E[num_real:]
    if num_null == 0:
        return load_E.mean() - load_E
    if target_real_k is None:
        return torch.cat([real_E.mean() - real_E, torch.zeros_like(null_N)])
    routes = load_E.sum()
    real_target = routes * target_real_k / (top_k * num_real)
    null_target = routes * (1 - target_real_k / top_k) / num_null
    return torch.cat([real_target - real_E, null_target - null_N])


def real_routes_histogram(ids_TK: torch.Tensor) -> torch.Tensor:
    """[K + 1] tokens that run 0, 1, ..., K real experts (routes not marked -1), by a scatter (no host sync)."""
    real_T = (ids_TK >= 0).sum(dim=1)
    return torch.zeros(ids_TK.shape[1] + 1, dtype=torch.int64, device=ids_TK.device).scatter_add_(
        0, real_T, torch.ones_like(real_T))
