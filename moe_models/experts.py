"""The fast expert path: tokens sorted by expert with index operations, all local experts in one grouped GEMM.

``GroupedMoE`` is a ``deepspeed.moe.layer.MoE``: DeepSpeed builds the gate, the per-expert modules
(``deepspeed_moe.experts.deepspeed_experts.{i}``, with the same expert-parallel flags) and the process
groups, so the engine, checkpoints, resharding and export see the stock layer. Only the MOELayer inside
is replaced by ``GroupedMOELayer``, whose forward never builds [tokens, experts, capacity] tensors.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from .routing import capacity_routes, dropless_routes, tokens_per_expert

grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class GroupedMoE(MoE):
    """``deepspeed.moe.layer.MoE`` with the grouped, index-based expert path (same arguments, plus
    ``gated_projections``: the (gate, up, down) attribute names of a SwiGLU-style expert, or None)."""

    def __init__(self, *args, gated_projections: Optional[tuple[str, str, str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        stock = self.deepspeed_moe
        self.deepspeed_moe = GroupedMOELayer(stock.gate, stock.experts, stock.ep_group_name, stock.ep_size,
                                             stock.num_local_experts, gated_projections)


class GroupedMOELayer(MOELayer):
    """MOELayer whose forward sorts routes by expert and runs the local experts as one grouped GEMM."""

    def __init__(self, gate, experts, ep_group_name, ep_size, num_local_experts,
                 gated_projections: Optional[tuple[str, str, str]]):
        super().__init__(gate, experts, ep_group_name, ep_size, num_local_experts)
        # called with (x_TD, topk_ids [K, T], exp_counts [E], l_aux) after routing, for the routing metrics
        self.route_observer: Optional[Callable] = None
        self.gated_projections = gated_projections if _grouped_gemm_fits(experts.deepspeed_experts[0],
                                                                         gated_projections) else None

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Steps:
          1. route: DeepSpeed's gate rules give each token's top-k global expert ids and fp32 weights
             (dropless: every route kept; capacity mode: DeepSpeed's own gate drops, marked -1);
          2. permute: routes are sorted by expert (a stable argsort) and their tokens gathered, x_RD;
          3. ep_size > 1: per-expert counts are exchanged once, rows travel by uneven all-to-all and are
             regrouped by local expert;
          4. experts: gate+up as one grouped GEMM, act(gate) * up, down as a second grouped GEMM (FFNs a
             grouped GEMM cannot express run expert by expert on their slices);
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
        # fp32 weights: the product and the sum over routes accumulate in fp32, as in DeepSpeed's decode.
        out_TD = (y_TKD * routes.weights_TK.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)
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
        experts = self.experts.deepspeed_experts
        if self.gated_projections is not None:
            return grouped_swiglu(x_RD, counts_E, experts, self.gated_projections)
        return expert_loop(x_RD, counts_E, experts)


def grouped_swiglu(x_RD: torch.Tensor, counts_E: torch.Tensor, experts: nn.ModuleList,
                   projections: tuple[str, str, str]) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for rows sorted by expert, as two grouped GEMMs over all local experts.

    The weights stay in DeepSpeed's per-expert modules (so checkpoints keep their layout); they are
    concatenated into [E, 2F, D] and [E, D, F] here on every call, one copy of the expert weights per
    forward (and its gradient split per backward). bench/moe_layer.py measures what that copy costs.
    """
    gate, up, down = projections
    w_gate_up_E2FD = torch.cat([getattr(e, name).weight for e in experts for name in (gate, up)])
    w_gate_up_E2FD = w_gate_up_E2FD.view(len(experts), -1, x_RD.shape[1])
    w_down_EDF = torch.stack([getattr(e, down).weight for e in experts])
    offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    gate_up_R2F = grouped_mm(x_RD, w_gate_up_E2FD.transpose(-2, -1), offs=offsets_E)
    gate_RF, up_RF = gate_up_R2F.chunk(2, dim=-1)
    h_RF = experts[0].act_fn(gate_RF) * up_RF
    return grouped_mm(h_RF, w_down_EDF.transpose(-2, -1), offs=offsets_E)


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
    """Whether the expert is bias-free SwiGLU-style with 16-byte aligned rows, as torch's grouped_mm needs."""
    if projections is None or grouped_mm is None or not hasattr(expert, "act_fn"):
        return False
    layers = [getattr(expert, name, None) for name in projections]
    if not all(isinstance(layer, nn.Linear) and layer.bias is None for layer in layers):
        return False
    # 8 elements = 16 bytes in bf16 (fp32 needs 4), so the check holds in either training dtype
    return all(size % 8 == 0 for size in layers[2].weight.shape)
