"""The MoE block placed into HF transformer blocks. Its core is ``deepspeed.moe.layer.MoE``.

This module knows DeepSpeed MoE internals (where the router and expert modules sit, how
expert-parallel groups are made); the only other modules that do are the fast expert path it can
choose (``experts.py``, ``routing.py``), which keeps DeepSpeed's module tree and parameter names.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from .config import MoEConfig
from .experts import GroupedMoE

# Names inside MoEFeedForward as state dicts and DeepSpeed's checkpoints spell them: the router weight, and the
# list of experts (a layer_{L}_expert_{E}_... checkpoint file holds `{EXPERTS}.{E}.*` with E the global expert id).
ROUTER_WEIGHT = "moe.deepspeed_moe.gate.wg.weight"
EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts"

class MoEFeedForward(nn.Module):
    """Drop-in for a dense FFN: hidden states [B, T, D] in, [B, T, D] out.

    Forward steps (all inside DeepSpeed's MoE, or its subclass ``experts.GroupedMoE`` with
    ``moe_impl="grouped"``, whose forward lists its own steps):
      1. the router scores every token against every expert and keeps the top-k;
      2. tokens are dispatched to their experts (an all-to-all when ep_size > 1);
      3. each local expert (a copy of the dense FFN module) runs on its tokens;
      4. outputs return and are combined with the router weights.
    The load-balancing loss and per-expert token counts of the last forward are kept in
    ``aux_loss`` and ``expert_counts`` for the trainer and metrics.
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

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def router(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def global_expert_ids(self) -> range:
        """Global ids of the experts this rank holds (ep rank r holds a contiguous slice)."""
        n_local = self.moe.num_local_experts
        first = expert_parallel_rank(self.moe.ep_size) * n_local
        return range(first, first + n_local)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output, self.aux_loss, self.expert_counts = self.moe(hidden_states)
        return output


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
