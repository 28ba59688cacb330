"""Step 2 (and the return of step 4) of an MoE forward: routes sorted by expert, to the rank that holds the
expert and back.

A dispatcher turns a token batch and its ``Routes`` into rows grouped by local expert (with a count per local
expert), and the experts' output rows back into each token's k outputs. No [tokens, experts, capacity] tensor is
built. ``LocalDispatcher`` serves ep_size 1; ``AllToAllDispatcher`` adds the expert-parallel exchange (torchtitan
and Megatron-Core keep it in the dispatcher too), so the layer's forward has no branch on ep_size or drops.
Shape letters: moe/__init__.py.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..run.distributed import ranks_on_this_node
from .routes import Routes, recomputing


class Sorted(NamedTuple):
    """What ``dispatch`` did, for ``combine`` to undo."""

    order_R: torch.Tensor                 # route index of each sorted row (routes sorted by expert, dropped last)
    top_k: int
    kept_R1: Optional[torch.Tensor]       # [R, 1] False for a dropped row (None when nothing can be dropped)
    exchange: Optional[tuple] = None      # AllToAllDispatcher: (send splits, recv splits, regrouping order, R)


class LocalDispatcher:
    """ep_size 1: every expert is local. Rows are the routes sorted by expert with a stable argsort (token order
    within an expert), dropped routes after the last expert's rows."""

    def __init__(self, num_experts: int, drops_possible: bool):
        self.num_experts = num_experts
        self.drops_possible = drops_possible

    def dispatch(self, x_TD: torch.Tensor, routes: Routes) -> tuple[torch.Tensor, torch.Tensor, Sorted]:
        """(x_ND rows grouped by local expert, counts per local expert, what combine needs)."""
        x_RD, sorted_ = self._sort(x_TD, routes)
        return x_RD, routes.kept_E, sorted_

    def combine(self, y_ND: torch.Tensor, sorted_: Sorted) -> torch.Tensor:
        """The experts' rows back in token order: y_TKD, zeros for dropped routes."""
        return self._unsort(y_ND, sorted_)

    def weighted_combine(self, y_ND: torch.Tensor, sorted_: Sorted, weights_TK: torch.Tensor) -> torch.Tensor:
        """Step 4 whole: the rows back in token order, each token's k outputs weighed and summed in fp32: out_TD."""
        return weighted_sum(self.combine(y_ND, sorted_), weights_TK)

    def _sort(self, x_TD: torch.Tensor, routes: Routes) -> tuple[torch.Tensor, Sorted]:
        ids_R = routes.topk_ids_TK.reshape(-1)
        dropped_last_R = torch.where(ids_R < 0, self.num_experts, ids_R)
        order_R = torch.argsort(dropped_last_R, stable=True)
        top_k = routes.topk_ids_TK.shape[1]
        x_RD = x_TD.index_select(0, order_R // top_k)
        kept_R1 = None
        if self.drops_possible:
            # grouped_mm leaves the rows after the last group (the dropped routes) unwritten, in its output and in
            # the input gradient: zero them on the way in and out so neither pass reads them.
            kept_R1 = (dropped_last_R.index_select(0, order_R) < self.num_experts).unsqueeze(1)
            x_RD = torch.where(kept_R1, x_RD, 0.0)
        return x_RD, Sorted(order_R, top_k, kept_R1)

    def _unsort(self, y_RD: torch.Tensor, sorted_: Sorted) -> torch.Tensor:
        if sorted_.kept_R1 is not None:
            y_RD = torch.where(sorted_.kept_R1, y_RD, 0.0)
        return y_RD.index_select(0, _inverse(sorted_.order_R)).view(-1, sorted_.top_k, y_RD.shape[1])


class AllToAllDispatcher(LocalDispatcher):
    """ep_size > 1: the sorted rows travel to the ranks holding their experts and back by uneven all-to-all.

    One count exchange (an all_to_all of the E per-expert counts) and one host read of the split sizes per layer;
    the rows then travel by torch's functional ``all_to_all_single_autograd`` (differentiable: the backward sends the
    gradients back with the splits reversed; torch.distributed.nn's, which it replaces, is deprecated). Only kept
    routes are sent; dropped ones come back as zeros.
    """

    def __init__(self, num_local_experts: int, ep_size: int):
        super().__init__(num_local_experts * ep_size, drops_possible=False)  # dropped rows are never sent
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts
        self.ep_group: Optional[dist.ProcessGroup] = None  # set with the layer's (DeepSpeed creates it later)
        self.sent_bytes = [0, 0]  # training bytes this rank sent to peers in its node, in other nodes (host ints)
        self._same_node: Optional[list[bool]] = None  # per peer of the group: on this rank's node

    def dispatch(self, x_TD: torch.Tensor, routes: Routes) -> tuple[torch.Tensor, torch.Tensor, Sorted]:
        ep, n_local = self.ep_size, self.num_local_experts
        x_RD, sorted_ = self._sort(x_TD, routes)
        counts_E = routes.kept_E
        recv_counts_E = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_E, counts_E, group=self.ep_group)
        sizes = torch.cat([counts_E.view(ep, n_local).sum(1), recv_counts_E.view(ep, n_local).sum(1)]).tolist()
        send_splits, recv_splits = sizes[:ep], sizes[ep:]
        num_kept, num_recv = sum(send_splits), sum(recv_splits)
        x_recv = all_to_all_single_autograd(x_RD[:num_kept].contiguous(), recv_splits, send_splits, self.ep_group)
        # received rows are grouped [source rank][local expert]; the experts want [local expert][source rank]
        local_ids = torch.arange(n_local, device=x_RD.device).repeat(ep)
        local_ids = local_ids.repeat_interleave(recv_counts_E, output_size=num_recv)
        by_expert = torch.argsort(local_ids, stable=True)
        counts_L = recv_counts_E.view(ep, n_local).sum(0)
        exchange = (send_splits, recv_splits, by_expert, x_RD.shape[0])
        if torch.is_grad_enabled():  # a training forward: count what it sends (eval forwards run without grad)
            self._count_sent(send_splits, recv_splits, x_RD.shape[1] * x_RD.element_size())
        return x_recv.index_select(0, by_expert), counts_L, sorted_._replace(exchange=exchange)

    def combine(self, y_ND: torch.Tensor, sorted_: Sorted) -> torch.Tensor:
        send_splits, recv_splits, by_expert, num_routes = sorted_.exchange
        y_recv = y_ND.index_select(0, _inverse(by_expert))
        num_kept = sum(send_splits)
        y_sent = all_to_all_single_autograd(y_recv.contiguous(), send_splits, recv_splits, self.ep_group)
        y_RD = torch.cat([y_sent, y_sent.new_zeros(num_routes - num_kept, y_ND.shape[1])])
        return self._unsort(y_RD, sorted_)

    def _count_sent(self, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> None:
        """The rows this layer's exchanges send to each peer, from the split sizes already on the host: the forward
        sends its routes (dispatch) and the experts' outputs of the peers' routes (combine); the backward sends the
        gradients of both the other way, counted here too, except in activation checkpointing's recompute (a
        forward again, whose backward is the one already counted)."""
        if self._same_node is None:
            node_size = ranks_on_this_node(default=dist.get_world_size())
            me = dist.get_rank() // node_size
            self._same_node = [rank // node_size == me for rank in dist.get_process_group_ranks(self.ep_group)]
        mine = dist.get_rank(group=self.ep_group)
        passes = 1 if recomputing() else 2
        for peer, same in enumerate(self._same_node):
            if peer != mine:
                self.sent_bytes[0 if same else 1] += passes * (send_splits[peer] + recv_splits[peer]) * row_bytes

    def take_sent_bytes(self) -> tuple[int, int]:
        """(in node, across nodes) bytes sent since the last call; the count restarts."""
        sent, self.sent_bytes = tuple(self.sent_bytes), [0, 0]
        return sent


def dispatcher_for(num_local_experts: int, ep_size: int, drop_tokens: bool) -> LocalDispatcher:
    """The dispatcher of a layer holding ``num_local_experts`` of its experts on each of ``ep_size`` ranks."""
    if ep_size > 1:
        return AllToAllDispatcher(num_local_experts, ep_size)
    return LocalDispatcher(num_local_experts, drop_tokens)


def weighted_sum(y_TKD: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Each token's k outputs weighed and summed as one batched GEMM, [T, 1, K] @ [T, K, D], in the weights' dtype
    (fp32, as in DeepSpeed's decode)."""
    weights_T1K = weights_TK.unsqueeze(1)
    return torch.bmm(weights_T1K, y_TKD.to(weights_T1K.dtype)).squeeze(1)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation, by a scatter (no host sync)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
