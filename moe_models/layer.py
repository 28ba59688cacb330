"""The MoE block placed into HF transformer blocks. Its core is ``deepspeed.moe.layer.MoE``.

This module knows DeepSpeed MoE internals (where the router and expert modules sit, how
expert-parallel groups are made); the only other modules that do are the fast expert path it can
choose (``experts.py``, ``routing.py``), which keeps DeepSpeed's module tree and state-dict names.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from .config import MoEConfig
from .experts import GroupedMoE, StackedExperts
from .routing_stats import RoutingCounters

# Names inside MoEFeedForward as state dicts and DeepSpeed's checkpoints spell them, with either expert path: the
# router weight, and the list of experts (a layer_{L}_expert_{E}_... checkpoint file holds `{EXPERTS}.{E}.*` with E
# the global expert id).

ROUTER_WEIGHT = "moe.deepspeed_moe.gate.wg.weight"
EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts"


class MoEFeedForward(nn.Module):
    """Drop-in for a dense FFN: hidden states [B, T, D] in, [B, T, D] out.

    Forward steps (all inside DeepSpeed's MoE, or its subclass ``experts.GroupedMoE`` with
    ``moe_impl="grouped"``, whose forward lists its own steps):
      1. the router scores every token against every expert and keeps the top-k;
      2. tokens are dispatched to their experts (an all-to-all when ep_size > 1);
      3. each local expert (it starts as a copy of the dense FFN) runs on its tokens;
      4. outputs return and are combined with the router weights.
    The load-balancing loss and per-expert token counts of the last forward are kept in
    ``aux_loss`` and ``expert_counts`` for the trainer; ``routing`` sums the routing of every
    training forward on the device for the metrics (docs/metrics.md).
    """

    def __init__(self, dense_ffn: nn.Module, hidden_size: int, num_experts: int, cfg: MoEConfig,
                 gated_projections: Optional[tuple[str, str, str]] = None):
        super().__init__()
        args = dict(expert=dense_ffn, num_experts=num_experts, ep_size=cfg.ep_size, k=cfg.top_k,
                    capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                    min_capacity=cfg.min_capacity, use_residual=cfg.use_residual,
                    noisy_gate_policy=cfg.noisy_gate_policy, drop_tokens=cfg.drop_tokens, use_rts=cfg.use_rts,
                    top2_2nd_expert_sampling=cfg.top2_2nd_expert_sampling)
        if cfg.moe_impl == "grouped":  # a MoE subclass: same parameters, names, flags and process groups
            self.moe = GroupedMoE(hidden_size, gated_projections=gated_projections, **args)
        else:
            self.moe = MoE(hidden_size, **args)
        self.aux_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None
        self.routing = RoutingCounters(num_experts)
        if cfg.moe_impl == "grouped":  # its dropless routing does not go through the gate module
            self.moe.deepspeed_moe.route_observer = self._count_routes
        else:
            self.moe.deepspeed_moe.gate.register_forward_hook(self._count_gate_output)

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def top_k(self) -> int:
        return self.moe.deepspeed_moe.gate.k

    @property
    def router(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def experts(self) -> nn.Module:
        """The module holding this rank's experts (its ``parameters()`` are all the local expert parameters):
        DeepSpeed's ``Experts`` (a list of expert modules) or, on the grouped path, ``StackedExperts``."""
        return self.moe.deepspeed_moe.experts

    def local_expert_weights(self, of: Callable = lambda param: param) -> list[dict[str, torch.Tensor]]:
        """Each local expert's weights by their names in the expert module (``up_proj.weight``...), in module order;
        with ``of``, what ``of(parameter)`` holds for them (e.g. ``lambda p: p.grad``). With ``StackedExperts``
        they are slices of the stacked parameters: in-place writes to the weights change the expert."""
        if isinstance(self.experts, StackedExperts):
            return [self.experts.expert_weights(i, of) for i in range(self.experts.num_experts)]
        return [{name: of(param) for name, param in expert.named_parameters()}
                for expert in self.experts.deepspeed_experts]

    def global_expert_ids(self) -> range:
        """Global ids of the experts this rank holds (ep rank r holds a contiguous slice)."""
        n_local = self.moe.num_local_experts
        first = expert_parallel_rank(self.moe.ep_size) * n_local
        return range(first, first + n_local)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output, self.aux_loss, self.expert_counts = self.moe(hidden_states)
        return output

    def _count_gate_output(self, gate: nn.Module, inputs: tuple, output: tuple) -> None:
        """Forward hook on DeepSpeed's TopKGate (stock layer). MOELayer calls the gate with sparse routes, so
        it returns (l_aux, capacity, num_experts, indices [k, S] with -1 for a route dropped by capacity,
        locations, gates, exp_counts [E] before drops)."""
        l_aux, _, _, indices_KS, _, _, chosen_E = output
        self._count_routes(inputs[0], indices_KS, chosen_E, l_aux)

    @torch.no_grad()
    def _count_routes(self, x_SD: torch.Tensor, indices_KS: torch.Tensor, chosen_E: torch.Tensor,
                      l_aux: torch.Tensor) -> None:
        """Add a training forward's routing to ``routing`` (on device). The router distribution is recomputed
        from the gate's input as the gate computes it (fp32 logits), without the noise of a noisy gate."""
        gate = self.moe.deepspeed_moe.gate
        if not (gate.training and self.routing.enabled):
            return
        logits_SE = F.linear(x_SD.float(), gate.wg.weight.float())
        self.routing.add(indices_KS, chosen_E, logits_SE, l_aux)

    @torch.no_grad()
    def expert_direction_sum_sq(self, chunk_elements: int = 2**24) -> float:
        """|sum_e w_e / |w_e||^2 over all global experts e of this layer, w_e the expert's flattened weights.

        It equals E + 2 x (sum of the pairwise cosines), so no expert's weights leave its rank: each rank
        sums its local experts' unit vectors and, with ep_size > 1, the sums are all-reduced over the
        expert-parallel group, ``chunk_elements`` (fp32) at a time. Every rank must call it.
        """
        ep_group, ep_size = self.moe.deepspeed_moe.ep_group, self.moe.ep_size
        experts = [list(weights.values()) for weights in self.local_expert_weights()]
        norms_L = [torch.stack([torch.linalg.vector_norm(p.detach().float()).double() for p in weights])
                   .square().sum().sqrt() for weights in experts]
        total = torch.zeros((), dtype=torch.float64, device=norms_L[0].device)
        for same_param in zip(*experts):
            flat_L = [p.detach().flatten() for p in same_param]
            for start in range(0, flat_L[0].numel(), chunk_elements):
                direction_sum_N = sum(flat[start:start + chunk_elements].float() / norm
                                      for flat, norm in zip(flat_L, norms_L))
                if ep_size > 1:
                    dist.all_reduce(direction_sum_N, group=ep_group)
                total += direction_sum_N.double().square().sum()
        return total.item()


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's position in its expert-parallel group, using DeepSpeed's own group layout.

    The groups are created here (DeepSpeed's engine would create the same ones at initialize) so that
    experts can be initialised by global expert id before the engine exists.
    """
    if ep_size == 1:
        return 0
    if not dist.is_initialized():
        raise RuntimeError(f"ep_size={ep_size} needs torch.distributed: launch with "
                           f"`deepspeed --num_gpus N train.py ...` where N is a multiple of {ep_size}")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(name)


def moe_layers_of(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def balance_loss(layers: list[MoEFeedForward]) -> torch.Tensor:
    """Sum of the load-balancing losses of the last forward over all MoE layers."""
    return torch.stack([layer.aux_loss for layer in layers]).sum()
