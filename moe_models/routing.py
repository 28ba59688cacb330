"""Dropless top-k routing with DeepSpeed's gate rules, as index tensors and without host syncs.

DeepSpeed's ``TopKGate`` with ``drop_tokens=False`` reads the busiest expert's count to the host (and
all-reduces it over the expert-parallel group) to size its capacity; a dropless grouped path needs no
capacity, so these functions keep the gate's rules (fp32 logits, jitter/RSample noise, Gumbel-sampled
second expert, top-1 weights un-normalised, top-2/top-k renormalised, the same balance loss) and
leave out the capacity. Written here because the gate's own functions cannot skip it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, gumbel_rsample, multiplicative_jitter


class Routes(NamedTuple):
    l_aux: torch.Tensor            # the gate's balance loss (a scalar)
    topk_ids_TK: torch.Tensor      # global expert id of each token's k routes; -1 = dropped by capacity
    weights_TK: torch.Tensor       # fp32 combine weight of each route (0 for dropped routes)
    exp_counts_E: torch.Tensor     # routes per expert before any drop (DeepSpeed's exp_counts)


def gate_logits(gate: TopKGate, x_TD: torch.Tensor) -> torch.Tensor:
    """fp32 router logits exactly as ``TopKGate.forward`` computes them (jitter only in training)."""
    x_TD = x_TD.float()
    if gate.noisy_gate_policy == "Jitter" and gate.training:
        x_TD = multiplicative_jitter(x_TD, device=x_TD.device)
    return F.linear(x_TD, gate.wg.weight.float())


def dropless_routes(gate: TopKGate, x_TD: torch.Tensor) -> Routes:
    """Every token's top-k experts and weights by the rules of DeepSpeed's top1/top2/topk gating."""
    logits_TE = gate_logits(gate, x_TD)
    probs_TE = F.softmax(logits_TE, dim=1)
    num_experts, k = probs_TE.shape[1], gate.k
    me_E = probs_TE.mean(dim=0)
    if k == 1:
        rsample = gate.noisy_gate_policy == "RSample" and gate.training
        chooser_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device) if rsample else probs_TE
        topk_ids_TK = chooser_TE.argmax(dim=1, keepdim=True)
        weights_TK = probs_TE.gather(1, topk_ids_TK)  # top-1 keeps the raw probability
        l_aux = (me_E * _mask(probs_TE, topk_ids_TK).mean(dim=0)).sum() * num_experts
    elif k == 2:
        first_T1 = probs_TE.argmax(dim=1, keepdim=True)
        if gate.top2_2nd_expert_sampling:  # DeepSpeed samples the second expert in eval mode too
            logits_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device)
        first_mask_TE = _mask(probs_TE, first_T1)
        second_T1 = logits_TE.masked_fill(first_mask_TE.bool(), float("-inf")).argmax(dim=1, keepdim=True)
        topk_ids_TK = torch.cat([first_T1, second_T1], dim=1)
        weights_TK = _renormalised(probs_TE.gather(1, topk_ids_TK))
        l_aux = (me_E * first_mask_TE.mean(dim=0)).mean() * num_experts * num_experts
    else:
        top_probs_TK, topk_ids_TK = torch.topk(probs_TE, k=k, dim=1)
        weights_TK = _renormalised(top_probs_TK)
        l_aux = (me_E * _mask(probs_TE, topk_ids_TK).mean(dim=0)).mean() * num_experts * num_experts / k
    return Routes(l_aux, topk_ids_TK, weights_TK, tokens_per_expert(topk_ids_TK, num_experts))


def capacity_routes(gate: TopKGate, x_TD: torch.Tensor) -> Routes:
    """DeepSpeed's own gate with its capacity limit, in its sparse form: drops exactly as the stock layer.

    The gate reads the capacity to the host for top-1 and top-k (k > 2), as in the stock layer.
    """
    l_aux, _capacity, _num_experts, indices_KT, _locations_KT, gates_KT, exp_counts_E = gate(x_TD, None, True, False)
    return Routes(l_aux, indices_KT.t().long(), gates_KT.t(), exp_counts_E)


def tokens_per_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert (int64), not counting dropped routes (-1); a scatter, so no host sync."""
    bins_R = torch.where(topk_ids_TK < 0, num_experts, topk_ids_TK).reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=bins_R.device)
    return counts.scatter_add_(0, bins_R, torch.ones_like(bins_R))[:num_experts]


def _mask(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """1.0 where a token routes to an expert: a scatter (F.one_hot checks its input on the host on some devices)."""
    return torch.zeros_like(probs_TE).scatter_(1, ids_TK, 1.0)


def _renormalised(weights_TK: torch.Tensor) -> torch.Tensor:
    return weights_TK / weights_TK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).eps)
