"""Routing counters: every training forward's ``Routes`` of one MoE layer added to sums kept on the device.

No host sync per forward: the trainer sums the counters over ranks and reads them once per logging interval,
then ``metrics.routing.routing_metrics`` turns the sums into the logged values (docs/metrics.md).
"""

from __future__ import annotations

import torch

from ..metrics.routing import router_entropy_sum, router_logit_norm_sum, router_z_loss
from .router import Routes


class RoutingCounters:
    """On-device sums of one MoE layer's routing over the training forwards of a logging interval.

    ``values`` holds [kept routes per expert (E), routes chosen per expert before capacity (E),
    router entropy summed over tokens, balance loss and z-loss summed over forwards, router-logit norm summed over
    tokens]; the token and forward counts are known from shapes, so they stay on the host. ``enabled = False`` stops
    counting.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.enabled = True
        self.values: torch.Tensor | None = None
        self.tokens = 0
        self.forwards = 0

    @torch.no_grad()
    def add(self, routes: Routes) -> None:
        E = self.num_experts
        if self.values is None:
            self.values = torch.zeros(2 * E + 4, dtype=torch.float64, device=routes.logits_TE.device)
        self.values[:E] += routes.kept_E
        self.values[E:2 * E] += routes.chosen_E
        self.values[2 * E] += router_entropy_sum(routes.logits_TE)
        self.values[2 * E + 1] += routes.balance_loss.detach()
        self.values[2 * E + 2] += router_z_loss(routes.logits_TE)
        self.values[2 * E + 3] += router_logit_norm_sum(routes.logits_TE)
        self.tokens += routes.topk_ids_TK.shape[0]
        self.forwards += 1

    def as_vector(self, device: torch.device) -> torch.Tensor:
        """The sums followed by the token and forward counts (zeros before the first forward)."""
        values = self.values if self.values is not None else torch.zeros(2 * self.num_experts + 4,
                                                                          dtype=torch.float64, device=device)
        counts = torch.tensor([self.tokens, self.forwards], dtype=torch.float64, device=values.device)
        return torch.cat([values, counts])

    @property
    def vector_size(self) -> int:
        return 2 * self.num_experts + 6

    def reset(self) -> None:
        if self.values is not None:
            self.values.zero_()
        self.tokens = self.forwards = 0
