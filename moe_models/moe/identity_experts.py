"""The experts of a sparse block whose router also chooses identity experts, continued in place: LongCat-Flash's
``LongcatFlashExperts`` (the one such class of transformers 5.17). Its router scores E + Z classes (softmax, top-k
by the scores plus its ``e_score_correction_bias``, the weights the scores times ``routed_scaling_factor``) and hands
the block's experts ids 0..E+Z-1: ids below E run expert id, ids E..E+Z-1 are its ``zero_expert_num`` Z
"zero-computation" experts, each the identity, so a route to one adds the token itself times its weight.

``IdentityExperts`` runs the ids below E as ``FusedExperts`` does (dispatch -> grouped GEMMs -> combine, at any
ep_size) and the identity routes on the token's own rank, without dispatch: the token times the sum of its identity
routes' weights (``Routes.null_weight_T``, as our own layer's identity null experts: moe/layer.py). Such a route runs
no expert: it is -1 in the routes (``real_experts_per_token`` does not count it), and counted per identity expert in
``Routes.chosen_null`` (``null_route_share``; the step's load of the correction bias, E + Z entries).

The class allocates ``gate_up_proj`` [E + Z, 2F, D] and uses its first E rows: the Z others are no expert's and get
no gradient. They are not this layer's parameters: ``idle_gate_up_rows`` hands them to hf/in_place.py, which keeps
them as a buffer of the block for the export. The router returns its top-k weights and ids alone, not its logits:
those of a training forward (for the metrics) are its classifier's on its input, as its forward computes them
(``F.linear`` of fp32 input and weight, no bias), recomputed without gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fused_experts import FusedExperts, forward_arguments, fused_experts_problem
from .routes import Routes, recomputing, routes_per_expert

IDENTITY_COUNT = "zero_expert_num"  # the family module's count of its identity experts (LongcatFlashExperts)


def identity_expert_count(family_experts: nn.Module) -> int:
    """The identity experts the family's experts module runs past its E experts (0: none)."""
    count = getattr(family_experts, IDENTITY_COUNT, 0)
    return count if isinstance(count, int) and count > 0 else 0


class IdentityExperts(FusedExperts):
    """This rank's share of the E experts of a block whose routes E..E+Z-1 are identity experts, and those routes
    run on each token's own rank."""

    def __init__(self, family_experts: nn.Module, hidden_size: int, ep_size: int = 1, ep_rank: int = 0,
                 router: Optional[nn.Module] = None):
        problem = self.problem(family_experts, hidden_size, router)
        if problem:
            raise ValueError(problem)
        idle = family_experts.gate_up_proj.detach()[family_experts.down_proj.shape[0]:].clone()
        self.__dict__["idle_gate_up_rows"] = idle  # not a buffer of this module: DeepSpeed's checkpoint would drop it
        super().__init__(family_experts, hidden_size, ep_size, ep_rank, router)
        self.num_identity_experts = identity_expert_count(family_experts)
        self.router_classes = self.num_experts + self.num_identity_experts

    @classmethod
    def problem(cls, family_experts: nn.Module, hidden_size: int, router: Optional[nn.Module]) -> Optional[str]:
        """Fused parameters with gate_up_proj's Z idle rows, a forward taking the router's top-k, and a router whose
        classifier scores the E + Z classes."""
        identities = identity_expert_count(family_experts)
        problem = fused_experts_problem(family_experts, hidden_size, idle_gate_up_rows=identities)
        if problem:
            return problem
        name = type(family_experts).__name__
        if len(forward_arguments(family_experts)) < 3:
            return f"{name}.forward takes ({', '.join(forward_arguments(family_experts))}), not the router's top-k"
        classes = family_experts.down_proj.shape[0] + identities
        classifier = getattr(router, "classifier", None)
        if not isinstance(classifier, nn.Linear) or classifier.out_features != classes:
            return (f"{name}'s block has no router with a classifier of {classes} outputs (its experts and identity "
                    f"experts) beside it ({type(router).__name__})")
        return None

    def _keep_router_logits(self, module, args, output) -> None:
        """The router's logits, recomputed from its input as its forward computes them (a training forward only:
        the metrics' ones)."""
        if not self.training or not self.routing.enabled or recomputing():
            self._router_logits = None
            return
        with torch.no_grad():
            hidden_TD = args[0].reshape(-1, module.classifier.in_features)
            self._router_logits = F.linear(hidden_TD.float(), module.classifier.weight.float())

    def _routes(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor, logits_TE: Optional[torch.Tensor]) -> Routes:
        """The routes to the E experts as FusedExperts runs them; those to identity experts -1, their weights summed
        per token (its input's share of its output) and their count per identity expert."""
        identity_TK = (ids_TK >= self.num_experts) & (ids_TK < self.router_classes)
        null_weight_T = torch.where(identity_TK, weights_TK, 0.0).sum(dim=1)
        chosen_null = routes_per_expert(torch.where(identity_TK, ids_TK - self.num_experts, -1),
                                        self.num_identity_experts)
        return super()._routes(ids_TK, weights_TK, logits_TE)._replace(chosen_null=chosen_null,
                                                                        null_weight_T=null_weight_T)
