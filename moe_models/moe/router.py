"""Step 1 of an MoE forward: the router. One GEMM per forward gives the logits; DeepSpeed's gate rules turn them
into each token's top-k experts and weights, as one ``Routes`` record that the dispatcher, the combine and the
routing counters all read.

Shape letters: moe/__init__.py.

Two rule sets:
  - dropless: the rules of DeepSpeed's top1/top2/topk gating (fp32 logits, Jitter/RSample noise, Gumbel-sampled
    second expert, top-1 weights un-normalised, top-2/top-k renormalised, the same balance loss) without the
    capacity. DeepSpeed's ``TopKGate`` with ``drop_tokens=False`` reads the busiest expert's count to the host
    (and all-reduces it over the expert-parallel group) to size a capacity a dropless path does not need; its
    functions cannot skip that, so these rules are written here.
  - capacity: DeepSpeed's own gating functions on the same logits, in their sparse form, so routes are dropped
    exactly as the stock layer drops them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, gumbel_rsample, multiplicative_jitter, top1gating, top2gating, topkgating


class Routes(NamedTuple):
    """Where every token of one forward goes."""

    logits_TE: torch.Tensor        # fp32 router logits (of the jittered input under noisy_gate_policy Jitter)
    topk_ids_TK: torch.Tensor      # global expert id of each token's k routes; -1 = dropped by capacity
    weights_TK: torch.Tensor       # fp32 combine weight of each route (0 for dropped routes)
    chosen_E: torch.Tensor         # routes per expert as chosen, before any drop (DeepSpeed's exp_counts)
    kept_E: torch.Tensor           # routes per expert the experts process (chosen_E less the drops)
    balance_loss: torch.Tensor     # the gate's load-balancing loss (a scalar; DeepSpeed's l_aux)


class Router(TopKGate):
    """DeepSpeed's ``TopKGate`` (same arguments, parameter ``wg`` and process group) whose logits are computed once
    per forward and kept in the ``Routes`` of the last forward (``last_routes``), for the routing counters.

    ``route`` is the grouped layer's step 1; ``forward`` keeps TopKGate's contract, so the stock ``MOELayer``
    (``--moe_impl deepspeed``) runs through it unchanged.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_routes: Optional[Routes] = None

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 router logits exactly as ``TopKGate.forward`` computes them (jitter only in training)."""
        x_TD = x_TD.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x_TD = multiplicative_jitter(x_TD, device=x_TD.device)
        return F.linear(x_TD, self.wg.weight.float())

    def route(self, x_TD: torch.Tensor) -> Routes:
        """Every token's routes: with a capacity (drop_tokens) by DeepSpeed's gating, else by the dropless rules."""
        logits_TE = self.logits(x_TD)
        if self.drop_tokens:
            routes = capacity_routes(logits_TE, self._deepspeed_gating(logits_TE, None, sparse_routes=True))
        else:
            routes = dropless_routes(logits_TE, self.k, self.noisy_gate_policy == "RSample" and self.training,
                                     self.top2_2nd_expert_sampling)
        self.last_routes = routes
        return routes

    def forward(self, input: torch.Tensor, used_token: Optional[torch.Tensor] = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        """TopKGate.forward: DeepSpeed's gate output for the stock MOELayer; the Routes are kept beside it."""
        logits_TE = self.logits(input)
        output = self._deepspeed_gating(logits_TE, used_token, sparse_routes, use_tutel)
        self.last_routes = capacity_routes(logits_TE, output) if sparse_routes and not use_tutel else None
        return output

    def _deepspeed_gating(self, logits_TE: torch.Tensor, used_token, sparse_routes: bool, use_tutel: bool = False):
        """What TopKGate.forward does after its GEMM: DeepSpeed's top1/top2/topk gating functions (timers left out)."""
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            return top1gating(logits_TE, capacity_factor, self.min_capacity, used_token,
                              self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts,
                              self.ep_group, sparse_routes, use_tutel)
        if self.k == 2:
            return top2gating(logits_TE, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                              self.top2_2nd_expert_sampling, sparse_routes)
        return topkgating(logits_TE, self.k, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                          sparse_routes=sparse_routes)


def capacity_routes(logits_TE: torch.Tensor, sparse_gate_output: tuple) -> Routes:
    """Routes from DeepSpeed's gating in its sparse form: (l_aux, capacity, E, indices [K, T] with -1 for a route
    dropped by capacity, locations, gates [K, T], exp_counts [E] before drops). The gating reads the capacity to
    the host for top-1 and top-k (k > 2), as in the stock layer."""
    l_aux, _capacity, num_experts, indices_KT, _locations_KT, gates_KT, chosen_E = sparse_gate_output
    topk_ids_TK = indices_KT.t().long()
    return Routes(logits_TE, topk_ids_TK, gates_KT.t(), chosen_E, routes_per_expert(topk_ids_TK, logits_TE.shape[1]),
                  l_aux)


def dropless_routes(logits_TE: torch.Tensor, k: int, rsample: bool, sample_second: bool) -> Routes:
    """Every token's top-k experts and weights by the rules of DeepSpeed's top1/top2/topk gating, none dropped.

    ``rsample``: top-1 picks by Gumbel-perturbed logits (RSample noise, training only); ``sample_second``: top-2
    picks its second expert with Gumbel noise (DeepSpeed does so in eval mode too)."""
    probs_TE = F.softmax(logits_TE, dim=1)
    num_experts = probs_TE.shape[1]
    me_E = probs_TE.mean(dim=0)
    if k == 1:
        chooser_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device) if rsample else probs_TE
        topk_ids_TK = chooser_TE.argmax(dim=1, keepdim=True)
        weights_TK = probs_TE.gather(1, topk_ids_TK)  # top-1 keeps the raw probability
        balance_loss = (me_E * _mask(probs_TE, topk_ids_TK).mean(dim=0)).sum() * num_experts
    elif k == 2:
        first_T1 = probs_TE.argmax(dim=1, keepdim=True)
        chooser_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device) if sample_second else logits_TE
        first_mask_TE = _mask(probs_TE, first_T1)
        second_T1 = chooser_TE.masked_fill(first_mask_TE.bool(), float("-inf")).argmax(dim=1, keepdim=True)
        topk_ids_TK = torch.cat([first_T1, second_T1], dim=1)
        weights_TK = _renormalised(probs_TE.gather(1, topk_ids_TK))
        balance_loss = (me_E * first_mask_TE.mean(dim=0)).mean() * num_experts * num_experts
    else:
        top_probs_TK, topk_ids_TK = torch.topk(probs_TE, k=k, dim=1)
        weights_TK = _renormalised(top_probs_TK)
        balance_loss = (me_E * _mask(probs_TE, topk_ids_TK).mean(dim=0)).mean() * num_experts * num_experts / k
    counts_E = routes_per_expert(topk_ids_TK, num_experts)
    return Routes(logits_TE, topk_ids_TK, weights_TK, counts_E, counts_E, balance_loss)  # dropless: kept = chosen


def routes_per_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert (int64), not counting dropped routes (-1): the one place routes are counted. A scatter,
    so no host sync (torch.bincount reads the largest index back to the host on CUDA)."""
    bins_R = torch.where(topk_ids_TK < 0, num_experts, topk_ids_TK).reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=bins_R.device)
    return counts.scatter_add_(0, bins_R, torch.ones_like(bins_R))[:num_experts]


def _mask(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """1.0 where a token routes to an expert: a scatter (F.one_hot checks its input on the host on some devices)."""
    return torch.zeros_like(probs_TE).scatter_(1, ids_TK, 1.0)


def _renormalised(weights_TK: torch.Tensor) -> torch.Tensor:
    return weights_TK / weights_TK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).eps)
