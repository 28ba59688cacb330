"""The experts of a sparse block that runs every expert on every token, continued sparsely: Llama 4's
``Llama4TextMoe`` (the one such block of transformers 5.17), whose code is

    router_scores, router_logits = self.router(hidden_states)        # scores [T, E]: sigmoid of the top-k, 0 elsewhere
    routed_in = hidden_states.repeat(E, 1) * router_scores.transpose(0, 1).reshape(-1, 1)   # [E x T, D], expert-major
    routed_out = self.experts(routed_in)                               # every expert on its T rows
    out = shared_expert(hidden_states) + routed_out.reshape(E, T, D).sum(0)

So token t's output is its shared expert's plus, over its top-k experts e, expert_e(s_te x_t): the score scales the
expert's input, and the rows of the other experts are 0, which a gated expert without biases maps to 0.
``ExpertMajorExperts`` takes that ``experts`` module's place with the same forward (``routed_in`` -> ``routed_out``):
each token's expert is the top-1 of the router's logits (kept by the forward hook on the router, as the stock router
takes them), its input is its row of that expert, ``routed_in[e x T + t]``, and the routes run through
``FusedExperts``' dispatch -> grouped GEMMs -> combine with weight 1; each output goes back to its row of an
[E x T, D] zero tensor, which the block sums. Routes, metrics, padding and expert parallelism are FusedExperts', per
token. A router of top-k > 1 is refused: a token's k routes would then carry k different inputs, and the dispatcher
sends one row per token to each of its experts.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .fused_experts import FusedExperts, forward_arguments, fused_experts_problem, router_logits_positions


class ExpertMajorExperts(FusedExperts):
    """This rank's share of the experts of a block that hands them ``routed_in`` [E x T, D] (expert-major, each row
    its token scaled by the router's score), run sparsely: each token's top-1 route only."""

    @classmethod
    def problem(cls, family_experts: nn.Module, hidden_size: int, router: Optional[nn.Module]) -> Optional[str]:
        """Fused parameters, a forward of the hidden states alone, and a top-1 router beside it."""
        problem = fused_experts_problem(family_experts, hidden_size)
        if problem:
            return problem
        name = type(family_experts).__name__
        if forward_arguments(family_experts) != ["hidden_states"]:
            return f"{name}.forward takes ({', '.join(forward_arguments(family_experts))}), not the hidden states alone"
        top_k = getattr(router, "top_k", None)
        if not isinstance(top_k, int):
            return f"{name}'s block has no router with a top_k beside it ({type(router).__name__})"
        if top_k != 1:
            return (f"{type(router).__name__} routes top-{top_k}: each of a token's routes would carry its own input "
                    "(the token scaled by that route's score), and only top-1 is continued in place "
                    "(num_experts_per_tok 1, as in the released Llama 4 models)")
        return None

    def _keep_router_logits(self, module, args, output) -> None:
        """The router returns (scores, logits), both [T, E]: its logits are the last of them."""
        outputs = output if isinstance(output, tuple) else (output,)
        found = router_logits_positions(outputs, self.router_classes)
        self._router_logits = outputs[found[-1]] if found else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``routed_out`` [E x T, D] of the block's ``routed_in`` [E x T, D]: each token's expert output at the row
        of its route, 0 in every other row."""
        if self._router_logits is None:
            raise RuntimeError(f"{type(self).__name__} was called without its router's logits: the block must run "
                               "its router before its experts")
        x_ETD = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        tokens_T = torch.arange(x_ETD.shape[1], device=x_ETD.device)
        ids_T1 = torch.topk(self._router_logits.detach().reshape(-1, self.num_experts), 1, dim=1).indices
        x_TD = x_ETD[ids_T1[:, 0], tokens_T]  # each token's input: its row of its expert
        out_TD = super().forward(x_TD, ids_T1, torch.ones_like(ids_T1, dtype=torch.float32))
        out_ETD = x_ETD.new_zeros(x_ETD.shape).index_put((ids_T1[:, 0], tokens_T), out_TD)
        return out_ETD.view(hidden_states.shape)
