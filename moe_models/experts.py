"""The fast expert path: tokens sorted by expert with index operations, all local experts in one grouped GEMM.

``GroupedMoE`` is a ``deepspeed.moe.layer.MoE``: DeepSpeed builds the gate, the local experts (with the same
expert-parallel flags) and the process groups. Two things are replaced:
  - the MOELayer, by ``GroupedMOELayer``, whose forward never builds [tokens, experts, capacity] tensors;
  - for SwiGLU experts, the list of expert modules, by ``StackedExperts``: DeepSpeed's own ``GroupedExperts``
    (``deepspeed.moe.ep_experts``: the local experts' weights held stacked, [E, F, D] and [E, D, F], and run as
    grouped GEMMs without copying the weights), which reads and writes state dicts under the per-expert names
    of the module list it replaces. DeepSpeed's checkpoints (one file per global expert), resharding and
    export therefore see the stock layer's names and tensors.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.ep_experts import GroupedExperts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from .routing import capacity_routes, dropless_routes, tokens_per_expert


class GroupedMoE(MoE):
    """``deepspeed.moe.layer.MoE`` with the grouped, index-based expert path (same arguments, plus
    ``gated_projections``: the (gate, up, down) attribute names of a SwiGLU-style expert, or None)."""

    def __init__(self, *args, gated_projections: Optional[tuple[str, str, str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        stock = self.deepspeed_moe
        experts = stock.experts
        if _grouped_gemm_fits(experts.deepspeed_experts[0], gated_projections):
            experts = StackedExperts(experts.deepspeed_experts, gated_projections, self.expert_group_name)
        self.deepspeed_moe = GroupedMOELayer(stock.gate, experts, stock.ep_group_name, stock.ep_size,
                                             stock.num_local_experts)


class GroupedMOELayer(MOELayer):
    """MOELayer whose forward sorts routes by expert and runs the local experts as one grouped GEMM."""

    def __init__(self, gate, experts, ep_group_name, ep_size, num_local_experts):
        super().__init__(gate, experts, ep_group_name, ep_size, num_local_experts)
        # called with (x_TD, topk_ids [K, T], exp_counts [E], l_aux) after routing, for the routing metrics
        self.route_observer: Optional[Callable] = None

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Steps:
          1. route: DeepSpeed's gate rules give each token's top-k global expert ids and fp32 weights
             (dropless: every route kept; capacity mode: DeepSpeed's own gate drops, marked -1);
          2. permute: routes are sorted by expert (a stable argsort) and their tokens gathered, x_RD;
          3. ep_size > 1: per-expert counts are exchanged once, rows travel by uneven all-to-all and are
             regrouped by local expert;
          4. experts: SwiGLU experts run as grouped GEMMs over all local experts (``StackedExperts``); FFNs a
             grouped GEMM cannot express run expert by expert on their slices;
          5. return: rows travel back, are unsorted to [T, K, D] and summed with the routing weights in fp32.
        Sets ``l_aux`` and ``exp_counts`` as DeepSpeed's MOELayer does.
        """
        if used_token is not None:
            raise ValueError("used_token is not supported by --moe_impl grouped; use --moe_impl deepspeed")
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        num_tokens, dim = x_TD.shape
        routes = capacity_routes(self.gate, x_TD) if self.gate.drop_tokens else dropless_routes(self.gate, x_TD)
        self.l_aux, self.exp_counts = routes.l_aux, routes.exp_counts_E
        if self.route_observer is not None:
            self.route_observer(x_TD, routes.topk_ids_TK.t(), routes.exp_counts_E, routes.l_aux)
        top_k, num_experts = routes.topk_ids_TK.shape[1], self.ep_size * self.num_local_experts

        ids_R = routes.topk_ids_TK.reshape(-1)
        dropped_last_R = torch.where(ids_R < 0, num_experts, ids_R)
        order_R = torch.argsort(dropped_last_R, stable=True)
        counts_E = tokens_per_expert(routes.topk_ids_TK, num_experts)
        x_RD = x_TD.index_select(0, order_R // top_k)

        if self.ep_size == 1 and not self.gate.drop_tokens:
            y_RD = self._run_experts(x_RD, counts_E)
        elif self.ep_size == 1:
            # Dropped routes sort after the last group, where grouped_mm leaves its output (and the input
            # gradient) unwritten: mask those rows on the way in and out so neither pass reads them.
            kept_R1 = (dropped_last_R.index_select(0, order_R) < num_experts).unsqueeze(1)
            y_RD = torch.where(kept_R1, self._run_experts(torch.where(kept_R1, x_RD, 0.0), counts_E), 0.0)
        else:
            y_RD = self._exchange_and_run(x_RD, counts_E)

        y_TKD = y_RD.index_select(0, _inverse(order_R)).view(num_tokens, top_k, dim)
        # [T, 1, K] @ [T, K, D] weighs and sums each token's routes in one batched GEMM, in fp32 (the gate's
        # weights) as in DeepSpeed's decode.
        weights_T1K = routes.weights_TK.unsqueeze(1)
        out_TD = torch.bmm(weights_T1K, y_TKD.to(weights_T1K.dtype)).squeeze(1).to(hidden_states.dtype)
        return out_TD.reshape(hidden_states.shape)

    def _exchange_and_run(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Send each row to the rank holding its expert, run the local experts, bring the results back.

        One count exchange (all_to_all of [ep, E_local] counts) and one host read of the split sizes per
        layer; the rows then travel by uneven all_to_all_single (differentiable, from torch.distributed.nn).
        """
        ep, n_local = self.ep_size, self.num_local_experts
        recv_counts_E = torch.empty_like(counts_E)
        torch.distributed.all_to_all_single(recv_counts_E, counts_E, group=self.ep_group)
        sizes = torch.cat([counts_E.view(ep, n_local).sum(1), recv_counts_E.view(ep, n_local).sum(1)]).tolist()
        send_splits, recv_splits = sizes[:ep], sizes[ep:]
        num_kept, num_recv = sum(send_splits), sum(recv_splits)

        x_recv = all_to_all_single(x_RD.new_empty(num_recv, x_RD.shape[1]), x_RD[:num_kept].contiguous(),
                                   recv_splits, send_splits, group=self.ep_group)
        # received rows are grouped [source rank][local expert]; the grouped GEMM wants [local expert][rank]
        local_ids = torch.arange(n_local, device=x_RD.device).repeat(ep)
        local_ids = local_ids.repeat_interleave(recv_counts_E, output_size=num_recv)
        by_expert = torch.argsort(local_ids, stable=True)
        y_local = self._run_experts(x_recv.index_select(0, by_expert), recv_counts_E.view(ep, n_local).sum(0))
        y_recv = y_local.index_select(0, _inverse(by_expert))
        y_sent = all_to_all_single(x_RD.new_empty(num_kept, x_RD.shape[1]), y_recv.contiguous(),
                                   send_splits, recv_splits, group=self.ep_group)
        return torch.cat([y_sent, y_sent.new_zeros(x_RD.shape[0] - num_kept, x_RD.shape[1])])

    def _run_experts(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if isinstance(self.experts, StackedExperts):
            return self.experts(x_RD, counts_E)
        return expert_loop(x_RD, counts_E, self.experts.deepspeed_experts)


class StackedExperts(GroupedExperts):
    """DeepSpeed's ``GroupedExperts`` made from a list of SwiGLU expert modules, under their names in state dicts.

    ``w1`` (gate) and ``w3`` (up) are [E, F, D], ``w2`` (down) [E, D, F]: local expert i's weights are the i-th
    slices, so no step copies them. The parameters carry DeepSpeed's expert flags (``allreduce=False``, the expert
    group's name), so the engine reduces and clips their gradients as it does the stock layer's. State dicts show
    the stock layer's keys, ``deepspeed_experts.{i}.{projection}.weight`` per local expert, and take them back.
    """

    STACKED = ("w1", "w3", "w2")  # GroupedExperts' parameters for the (gate, up, down) projections

    def __init__(self, experts: nn.ModuleList, projections: tuple[str, str, str], expert_group_name: str):
        gate = getattr(experts[0], projections[0])
        with torch.device("meta"):  # GroupedExperts allocates its own weights; they are replaced just below
            super().__init__(gate.in_features, gate.out_features, len(experts), activation="swiglu")
        self.projections = projections
        for stacked, projection in zip(self.STACKED, projections):
            with torch.no_grad():
                weight = torch.stack([getattr(expert, projection).weight for expert in experts])
            setattr(self, stacked, nn.Parameter(weight, requires_grad=gate.weight.requires_grad))
            param = getattr(self, stacked)  # flags after registering: accelerate's meta init re-creates it there
            param.allreduce, param.group_name, param.is_expert_group = False, expert_group_name, True
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stacked_state)

    def per_expert_keys(self, stacked: str) -> list[str]:
        """The state-dict keys (relative to this module) of the local experts' slices of parameter ``stacked``."""
        projection = self.projections[self.STACKED.index(stacked)]
        return [f"deepspeed_experts.{i}.{projection}.weight" for i in range(self.num_experts)]

    def expert_weights(self, i: int, of: Callable = lambda param: param) -> dict[str, torch.Tensor]:
        """Local expert i's slice of ``of(parameter)`` (default: the weights, as views) for each of its weights,
        named as in its module, in its order: gate, up, down."""
        return {f"{projection}.weight": of(getattr(self, stacked))[i]
                for stacked, projection in zip(self.STACKED, self.projections)}


def _per_expert_state(module: StackedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the stacked parameters become one entry per (local expert, projection), in module order."""
    stacked = {name: state_dict.pop(prefix + name) for name in module.STACKED}
    keys = {name: module.per_expert_keys(name) for name in module.STACKED}
    for i in range(module.num_experts):
        for name in module.STACKED:
            state_dict[prefix + keys[name][i]] = stacked[name][i]


def _stacked_state(module: StackedExperts, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: per-expert entries are stacked back (a missing one fails a strict load)."""
    for name in module.STACKED:
        keys = [prefix + key for key in module.per_expert_keys(name)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


def expert_loop(x_RD: torch.Tensor, counts_E: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Each local expert module on its rows, one after the other: for FFNs a grouped GEMM cannot express
    (GPT-2's Conv1D with biases and GELU, projections with biases, unaligned sizes). Reads the counts to
    the host (one sync per layer)."""
    counts = counts_E.tolist()
    chunks = x_RD.split([*counts, x_RD.shape[0] - sum(counts)])
    outputs = [_first(expert(chunk)) for expert, chunk in zip(experts, chunks)]
    return torch.cat([*outputs, chunks[-1].new_zeros(chunks[-1].shape)])


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation, by a scatter (no host sync)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _grouped_gemm_fits(expert: nn.Module, projections: Optional[tuple[str, str, str]]) -> bool:
    """Whether the expert is a bias-free SwiGLU (a silu gate: GroupedExperts' "swiglu") with 16-byte aligned rows,
    as torch's grouped_mm needs."""
    if projections is None or not hasattr(torch, "_grouped_mm") or not _is_silu(getattr(expert, "act_fn", None)):
        return False
    layers = [getattr(expert, name, None) for name in projections]
    if not all(isinstance(layer, nn.Linear) and layer.bias is None for layer in layers):
        return False
    # 8 elements = 16 bytes in bf16 (fp32 needs 4), so the check holds in either training dtype
    return all(size % 8 == 0 for size in layers[2].weight.shape)


def _is_silu(act_fn) -> bool:
    """Whether ``act_fn`` computes silu (HF families wrap it in several classes, so values are compared)."""
    if not callable(act_fn):
        return False
    probe = torch.linspace(-6, 6, 25, device="cpu")
    return torch.allclose(act_fn(probe), F.silu(probe))
