"""The experts of a sparse block that hands them the router's logits and lets them choose their routes: Aria's
``AriaExperts`` (the one such class of transformers 5.17), whose block calls ``self.experts(hidden_states,
router_logits)`` and whose experts take each token's top-k by their own ``route_tokens_to_experts`` (top-k of the
logits, the weights the softmax of those k logits) and run them as grouped GEMMs of ``fc1.weight`` [E, D, 2F] and
``fc2.weight`` [E, F, D] (``x @ w``), ``silu(first half) * second half`` between them.

``SelfRoutingExperts`` keeps that forward: it takes the routes from the family's own ``route_tokens_to_experts`` (so
the rule is the stock one, exactly) and runs them as ``FusedExperts`` does, ``fc1.weight`` being the fused
``gate_up_proj`` (transposed layout, the activated half first) and ``fc2.weight`` the fused ``down_proj``. The
per-expert entries of DeepSpeed's checkpoint keep the family's names (``deepspeed_experts.{i}.fc1.weight``), and the
export stacks them back under them. The metrics' logits are the block's router's output, as for every family.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .fused_experts import FusedExperts, forward_arguments, fused_experts_problem

FORWARD = ["hidden_states", "router_logits"]
FAMILY_NAMES = {"gate_up_proj": "fc1.weight", "down_proj": "fc2.weight"}  # AriaExperts' fused parameters


class SelfRoutingExperts(FusedExperts):
    """This rank's share of the experts of a block that hands them its router's logits, routed by their own rule."""

    @classmethod
    def problem(cls, family_experts: nn.Module, hidden_size: int, router: Optional[nn.Module]) -> Optional[str]:
        """A forward of (hidden_states, router_logits), the family's own top-k rule beside it, and fc1/fc2 fused."""
        name = type(family_experts).__name__
        if forward_arguments(family_experts) != FORWARD:
            return f"{name}.forward takes ({', '.join(forward_arguments(family_experts))}), not the router's logits"
        if not callable(getattr(family_experts, "route_tokens_to_experts", None)):
            return f"{name} has no route_tokens_to_experts, the rule its forward routes by"
        return fused_experts_problem(family_experts, hidden_size, names=FAMILY_NAMES)

    @classmethod
    def family_names(cls, family_experts: nn.Module) -> Optional[dict[str, str]]:
        return FAMILY_NAMES

    @classmethod
    def activation(cls, family_experts: nn.Module) -> Optional[nn.Module]:
        """AriaExperts' forward applies ``nn.functional.silu``, whatever its config's ``hidden_act``."""
        return nn.SiLU()

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The experts' output for tokens ``hidden_states`` [T, D] with the router's ``router_logits`` [T, E]: the
        routes the family's rule takes of them, run as every family's."""
        top_k_index, top_k_weights = self.experts.function.route_tokens_to_experts(router_logits)
        return super().forward(hidden_states, top_k_index, top_k_weights)
