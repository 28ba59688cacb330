"""Load balancing beyond DeepSpeed's gate: the balance loss over a micro-batch, per sequence or over the global
batch, and aux-loss-free balancing by a per-expert bias (docs/routing.md has each formula and its source).

Every balance loss here has the Switch Transformer form ``E x sum_e f_e x P_e``: ``f_e`` the share of routes
choosing expert e (so sum_e f_e = 1), ``P_e`` the mean normalised score of expert e. The forms differ only in the
tokens ``f`` and ``P`` are counted over. DeepSpeed's gate computes only its own micro-batch loss (``l_aux``) inside
its gating functions, and has no bias balancing, so these are written here. Shape letters: moe/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .adaptive import bias_gap

AUX_LOSS_TYPES = ("micro_batch", "sequence", "global_batch")


def balance_probs(scores_TE: torch.Tensor) -> torch.Tensor:
    """Each token's scores rescaled to sum to 1 (softmax scores already do; sigmoid scores do not), as the
    balance loss reads them (DeepSeek-V3's s'_{i,t})."""
    return scores_TE / scores_TE.sum(dim=1, keepdim=True).clamp(min=torch.finfo(scores_TE.dtype).tiny)


def switch_balance_loss(probs_TE: torch.Tensor, chosen_E: torch.Tensor, routes: float) -> torch.Tensor:
    """E x sum_e f_e x P_e with f_e = chosen_E / routes and P_e the mean of probs_TE over its tokens."""
    num_experts = probs_TE.shape[1]
    return num_experts * (chosen_E.to(probs_TE.dtype) / routes * probs_TE.mean(dim=0)).sum()


def sequence_balance_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, tokens_per_sequence: int) -> torch.Tensor:
    """The balance loss of each sequence (f and P over its own tokens), averaged over the sequences (DeepSeek-V2/V3's
    sequence-wise loss). Tokens come sequence after sequence, ``tokens_per_sequence`` each."""
    T, E = probs_TE.shape
    K = topk_ids_TK.shape[1]
    B, S = T // tokens_per_sequence, tokens_per_sequence
    chosen_BE = torch.zeros_like(probs_TE).scatter_(1, topk_ids_TK, 1.0).view(B, S, E).sum(dim=1)
    P_BE = probs_TE.view(B, S, E).mean(dim=1)
    return E * (chosen_BE / (S * K) * P_BE).sum(dim=1).mean()


def sequence_balance_loss_by_rows(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, rows_T: torch.Tensor,
                                  rows: int) -> torch.Tensor:
    """``sequence_balance_loss`` for sequences of different lengths: token t is in sequence ``rows_T[t]`` of
    ``rows`` (each with a token), as when a padded batch's real tokens alone are routed (moe/padding.py)."""
    T, E = probs_TE.shape
    K = topk_ids_TK.shape[1]
    chosen_TE = torch.zeros_like(probs_TE).scatter_(1, topk_ids_TK, 1.0)
    chosen_BE = probs_TE.new_zeros(rows, E).index_add_(0, rows_T, chosen_TE)
    P_sum_BE = probs_TE.new_zeros(rows, E).index_add_(0, rows_T, probs_TE)
    tokens_B1 = probs_TE.new_zeros(rows).index_add_(0, rows_T, probs_TE.new_ones(T)).unsqueeze(1)
    return E * (chosen_BE / (tokens_B1 * K) * P_sum_BE / tokens_B1).sum(dim=1).mean()


class StepLoad:
    """Routes chosen per expert over the training forwards of one optimizer step, for what balances by the step's
    load: this rank's counts (for the aux-loss-free bias) and, for the global-batch loss, every rank's so far (with
    their token count). ``reset`` after each optimizer step."""

    def __init__(self):
        self.local_E: Optional[torch.Tensor] = None
        self.all_ranks_E1: Optional[torch.Tensor] = None  # [E routes per expert..., tokens], summed over ranks

    def add_local(self, chosen_E: torch.Tensor) -> None:
        self.local_E = chosen_E.clone() if self.local_E is None else self.local_E + chosen_E

    def add_all_ranks(self, chosen_E: torch.Tensor, tokens: int) -> torch.Tensor:
        """This micro-step's counts summed over all ranks (one all-reduce of E + 1 values, on the device) and added
        to the step's; returns the step's so far: [routes per expert (E), tokens]."""
        counts_E1 = torch.cat([chosen_E.double(), chosen_E.new_tensor([tokens], dtype=torch.float64)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts_E1)
        self.all_ranks_E1 = counts_E1 if self.all_ranks_E1 is None else self.all_ranks_E1 + counts_E1
        return self.all_ranks_E1

    def reset(self) -> None:
        self.local_E = self.all_ranks_E1 = None


def global_batch_balance_loss(probs_TE: torch.Tensor, step_counts_E1: torch.Tensor, top_k: int) -> torch.Tensor:
    """The balance loss with f_e counted over the optimizer step so far on every rank (``StepLoad.add_all_ranks``)
    and P_e over this micro-batch (Qwen's global-batch loss, as Megatron-Core's global_aux_loss counts it)."""
    return switch_balance_loss(probs_TE, step_counts_E1[:-1], step_counts_E1[-1] * top_k)


@torch.no_grad()
def update_score_biases(routers: list) -> None:
    """Aux-loss-free balancing, after an optimizer step: ``bias_e += rate x sign(mean load - load_e)`` per layer,
    with each router's own rate (``scoring.router_bias_update_rate``; routers without it keep their bias), the load being
    every rank's routes per expert over the step (one all-reduce of all layers' counts, on the device). With null
    experts the gap is moe/adaptive.py's ``bias_gap`` (the real experts balanced, the null share held at the
    compute target when there is one). Every rank calls it, and every rank ends with the same biases."""
    biased = [router for router in routers if router.score_bias is not None and router.scoring.router_bias_update_rate > 0]
    if not biased:
        return
    loads = _summed_over_ranks([_local_load(router.step_load, router.score_bias) for router in biased])
    for router, load_E in zip(biased, loads):
        rate, scoring = router.scoring.router_bias_update_rate, router.scoring
        gap_E = bias_gap(load_E, router.num_real_experts, router.k, scoring.null_expert_target_real_k)
        router.score_bias += rate * torch.sign(gap_E).to(router.score_bias.dtype)


@dataclass
class CorrectionBias:
    """An HF family's own aux-loss-free bias (DeepSeek-V3's ``e_score_correction_bias``) that a layer continued in
    place moves (moe/fused_experts.py; hf/in_place_bias.py finds it): the tensor ``name`` of ``owner``, read at each
    use (the engine may move the module), and the rate of its updates."""

    owner: nn.Module
    name: str
    rate: float

    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.name)


@torch.no_grad()
def update_correction_biases(layers: list) -> None:
    """``update_score_biases`` for the in-place layers (FusedExperts) whose family's bias moves (``correction_bias``):
    ``bias_e += rate x sign(mean load - load_e)``, the load being every rank's routes per expert over the step (one
    all-reduce); a bias entry past the layer's E experts (an identity expert's: moe/identity_experts.py) stays, as a
    null expert's without a target (``bias_gap``). Every rank calls it, and every rank ends with the same biases."""
    biased = [layer for layer in layers if layer.correction_bias is not None]
    if not biased:
        return
    loads = _summed_over_ranks([_local_load(layer.step_load, layer.correction_bias.tensor()) for layer in biased])
    for layer, load_E in zip(biased, loads):
        bias = layer.correction_bias.tensor()
        gap_E = bias_gap(load_E, layer.num_experts, layer.routing.top_k, None)
        bias.view(-1).add_(layer.correction_bias.rate * torch.sign(gap_E).to(bias.dtype))


def _summed_over_ranks(loads: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each layer's routes per expert summed over every rank, by one all-reduce of them all."""
    summed = torch.cat(loads)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(summed)
    return summed.split([load.numel() for load in loads])


def _local_load(step_load: StepLoad, bias: torch.Tensor) -> torch.Tensor:
    """This rank's routes per expert of the step (float64; zeros shaped as ``bias`` before any forward)."""
    load_E = step_load.local_E
    return load_E.double() if load_E is not None else bias.new_zeros(bias.numel(), dtype=torch.float64)
