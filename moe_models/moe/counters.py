"""Routing counters: every training forward's ``Routes`` of one MoE layer added to named sums kept on the device.

No host sync per forward: a trainer sums the counters of all layers over ranks once per logging interval (moe/model_layers.py,
one all-reduce), then ``metrics.routing.routing_metrics`` turns the sums into the logged values (docs/metrics.md).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..metrics.routing import max_violation, router_entropy_sum, router_logit_norm_sum, router_z_loss
from .adaptive import real_routes_histogram
from .routes import Routes


@dataclass
class RoutingSums:
    """One MoE layer's routing over the training forwards of a logging interval (float64)."""

    kept_E: torch.Tensor             # routes per expert the experts processed
    chosen_E: torch.Tensor           # routes per expert as chosen, before capacity
    router_entropy: torch.Tensor     # entropy (nats) of each token's router distribution, summed over tokens
    balance_loss: torch.Tensor       # the gate's balance loss, summed over forwards
    z_loss: torch.Tensor             # the router z-loss, summed over forwards
    router_logit_norm: torch.Tensor  # each token's router-logit norm, summed over tokens
    max_violation: torch.Tensor      # each forward's (micro-batch's) max / mean chosen load - 1, summed over forwards
    last_step_E: torch.Tensor        # routes per expert chosen in the interval's last optimizer step (not a sum
    #                                  over the interval; summed over ranks it is the step's global batch)
    real_per_token_K1: torch.Tensor  # tokens that ran 0, 1, ..., top_k real experts (routes not marked -1)
    null_routes: torch.Tensor        # routes chosen to null experts
    tokens: torch.Tensor
    forwards: torch.Tensor

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device, top_k: int = 1) -> RoutingSums:
        sizes = {"_E": num_experts, "_K1": top_k + 1}
        return cls(**{f.name: torch.zeros(next((n for end, n in sizes.items() if f.name.endswith(end)), ()),
                                          dtype=torch.float64, device=device) for f in fields(cls)})


def named(record, prefix: str) -> dict[str, torch.Tensor]:
    """A sums record's fields as ``{prefix + name: tensor}``, for one all-reduce with other sums."""
    return {prefix + f.name: getattr(record, f.name) for f in fields(record)}


def from_named(cls, values: dict[str, torch.Tensor], prefix: str):
    """The record of type ``cls`` that ``named`` gave ``prefix`` to, from (reduced) values."""
    return cls(**{f.name: values[prefix + f.name] for f in fields(cls)})


class RoutingCounters:
    """The sums of one MoE layer's training forwards since the last ``reset``; ``enabled = False`` stops counting.
    ``top_k``: the routes per token (default: those of the first forward)."""

    def __init__(self, num_experts: int, top_k: int | None = None):
        self.num_experts = num_experts
        self.top_k = top_k
        self.enabled = True
        self._sums: RoutingSums | None = None  # made on the first forward's device
        self._step_E: torch.Tensor | None = None  # this optimizer step's chosen routes so far

    @torch.no_grad()
    def add(self, routes: Routes) -> None:
        if self._sums is None:
            self.top_k = self.top_k or routes.topk_ids_TK.shape[1]
            self._sums = RoutingSums.zeros(self.num_experts, routes.logits_TE.device, self.top_k)
        s = self._sums
        s.real_per_token_K1 += real_routes_histogram(routes.topk_ids_TK)
        if routes.chosen_null is not None:
            s.null_routes += routes.chosen_null.sum()
        s.kept_E += routes.kept_E
        s.chosen_E += routes.chosen_E
        s.router_entropy += router_entropy_sum(routes.logits_TE)
        s.balance_loss += routes.balance_loss.detach()
        s.z_loss += router_z_loss(routes.logits_TE)
        s.router_logit_norm += router_logit_norm_sum(routes.logits_TE)
        s.max_violation += max_violation(routes.chosen_E)
        s.tokens += routes.topk_ids_TK.shape[0]
        s.forwards += 1
        self._step_E = routes.chosen_E.double() if self._step_E is None else self._step_E + routes.chosen_E

    def end_step(self) -> None:
        """After each optimizer step: its routes become the interval's ``last_step_E`` (on the device)."""
        if self._sums is not None and self._step_E is not None:
            self._sums.last_step_E = self._step_E
        self._step_E = None

    def sums(self, device: torch.device) -> RoutingSums:
        """The interval's sums (zeros before the first forward)."""
        return self._sums if self._sums is not None else RoutingSums.zeros(self.num_experts, device, self.top_k or 1)

    def reset(self) -> None:
        self._sums = None
        self._step_E = None
