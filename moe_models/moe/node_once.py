"""`--dispatcher node_once`: a token crosses to each other node once, however many of its experts sit there.

The per-route dispatcher (moe/dispatcher.py) sends one row per route, so a token whose k experts sit on one other
node crosses the slow link k times. Here the expert-parallel exchange has two levels, on torch.distributed
collectives only (any backend), as DeepEP's, HybridEP's and Tutel's two-level all-to-alls do:

1. across nodes: each token goes once to every node holding one of its experts, to the rank of that node with this
   rank's local index (its peer in the *cross group*, the group's ranks with the same local index), with its routes
   on that node (node-local expert ids) and their weights;
2. inside that node: the relay rank sends each received row to the ranks holding its experts there, one row per
   route, by the per-route dispatcher over the *node group* (the group's ranks on one node);
3. the experts run; their rows come back to the relay, which weighs and sums each token's outputs of that node
   (fp32, as the combine does) and returns one row per token, in the activations' dtype;
4. across nodes back: the home rank adds its token's partial sums (fp32).

Results equal the per-route dispatcher's (the same sums, grouped by node; tests/moe/test_node_once.py); the router
weights get their gradients through the weights sent in step 1. An expert-parallel group inside one node has
nothing to save: there it is the per-route dispatcher. Shape letters: moe/__init__.py; S rows this rank sends
across (token, node pairs), Q rows it receives as a relay, M nodes of the group.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..run.distributed import ranks_on_this_node
from .dispatcher import AllToAllDispatcher, Sorted, weighted_sum
from .routes import Routes, recomputing, routes_per_expert


class NodeRoutes(NamedTuple):
    """The routes a relay received: what the per-route dispatcher reads of a ``Routes``."""

    topk_ids_TK: torch.Tensor   # node-local expert ids; -1 for a route to another node
    kept_E: torch.Tensor        # routes per expert of the node


class Crossing(NamedTuple):
    """What ``dispatch`` did, for ``weighted_combine`` to undo."""

    token_S: torch.Tensor       # the token of each row sent across (node-major)
    send_splits: list[int]      # rows sent to each node of the group
    recv_splits: list[int]      # rows received from each node
    weights_QK: torch.Tensor    # the received rows' route weights (0 for routes to other nodes)
    inner: Sorted               # the node group's per-route dispatch of the received rows
    num_tokens: int


class NodeOnceDispatcher(AllToAllDispatcher):
    """ep_size > 1 over several nodes: rows cross to each node once (module docstring). ``sent_bytes`` counts the
    rows and their route weights and ids that cross, and the per-route rows inside the node."""

    def __init__(self, num_local_experts: int, ep_size: int):
        self.inner: Optional[AllToAllDispatcher] = None  # the per-route dispatch inside a node
        self.cross_group: Optional[dist.ProcessGroup] = None
        self.num_nodes = 1
        super().__init__(num_local_experts, ep_size)

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        return self._ep_group

    @ep_group.setter
    def ep_group(self, group: Optional[dist.ProcessGroup]) -> None:
        """Set on every rank in the same order (DeepSpeed's ``_set_ep_group``): makes the node and cross groups."""
        self._ep_group = group
        if group is None:
            return
        node_size = ranks_on_this_node(default=dist.get_world_size())
        if self.ep_size <= node_size:
            self.inner, self.num_nodes = None, 1
            return
        node_group, self.cross_group = node_and_cross_groups(dist.get_process_group_ranks(group), node_size)
        self.num_nodes = self.ep_size // node_size
        self.inner = AllToAllDispatcher(self.num_local_experts, node_size)
        self.inner.ep_group = node_group

    def dispatch(self, x_TD: torch.Tensor, routes: Routes) -> tuple[torch.Tensor, torch.Tensor, Sorted | Crossing]:
        if self.inner is None:  # one node: nothing crosses
            return super().dispatch(x_TD, routes)
        T, K = routes.topk_ids_TK.shape
        M, per_node = self.num_nodes, self.num_local_experts * self.inner.ep_size
        ids_TK = routes.topk_ids_TK
        node_TK = torch.where(ids_TK >= 0, ids_TK // per_node, M)  # a dropped route: a node past the last
        needs_MT = torch.zeros(T, M + 1, dtype=torch.bool, device=x_TD.device).scatter_(1, node_TK, True)[:, :M].t()
        counts_M = needs_MT.sum(1)
        recv_counts_M = torch.empty_like(counts_M)
        dist.all_to_all_single(recv_counts_M, counts_M, group=self.cross_group)
        sizes = torch.cat([counts_M, recv_counts_M]).tolist()
        send_splits, recv_splits = sizes[:M], sizes[M:]
        pairs_S = torch.argsort((~needs_MT).reshape(-1).to(torch.uint8), stable=True)[:sum(send_splits)]
        token_S, node_S1 = pairs_S % T, (pairs_S // T).unsqueeze(1)
        on_node_SK = node_TK.index_select(0, token_S) == node_S1
        ids_SK = torch.where(on_node_SK, ids_TK.index_select(0, token_S) - node_S1 * per_node, -1)
        weights_SK = torch.where(on_node_SK, routes.weights_TK.index_select(0, token_S), 0.0)
        routes_SK2 = torch.cat([weights_SK, ids_SK.to(weights_SK.dtype)], dim=1)  # ids exact in fp32 below 2^24
        x_QD = all_to_all_single_autograd(x_TD.index_select(0, token_S), recv_splits, send_splits, self.cross_group)
        routes_QK2 = all_to_all_single_autograd(routes_SK2, recv_splits, send_splits, self.cross_group)
        ids_QK = routes_QK2[:, K:].detach().long()
        x_ND, counts_L, inner = self.inner.dispatch(x_QD, NodeRoutes(ids_QK, routes_per_expert(ids_QK, per_node)))
        if torch.is_grad_enabled():
            self._count_crossing(send_splits, recv_splits, x_TD.shape[1] * x_TD.element_size(),
                                 routes_SK2.shape[1] * routes_SK2.element_size())
        return x_ND, counts_L, Crossing(token_S, send_splits, recv_splits, routes_QK2[:, :K], inner, T)

    def weighted_combine(self, y_ND: torch.Tensor, sorted_: Sorted | Crossing,
                         weights_TK: torch.Tensor) -> torch.Tensor:
        """The relays' sums back and added per token (fp32). Across nodes the weights used are those that travelled
        with the rows (``routes.weights_TK``, which ``weights_TK`` is)."""
        if not isinstance(sorted_, Crossing):
            return super().weighted_combine(y_ND, sorted_, weights_TK)
        y_QKD = self.inner.combine(y_ND, sorted_.inner)
        partial_QD = weighted_sum(y_QKD, sorted_.weights_QK).to(y_ND.dtype)
        partial_SD = all_to_all_single_autograd(partial_QD, sorted_.send_splits, sorted_.recv_splits,
                                                self.cross_group)
        out_TD = weights_TK.new_zeros(sorted_.num_tokens, y_ND.shape[1])
        return out_TD.index_add(0, sorted_.token_S, partial_SD.to(out_TD.dtype))

    def _count_crossing(self, send_splits: list[int], recv_splits: list[int], row_bytes: int,
                        routes_bytes: int) -> None:
        """Bytes to the other nodes' relays, from the split sizes: the forward sends each row with its route weights
        and ids and returns the relayed sums; the backward sends the gradients of both the other way (not again
        in activation checkpointing's recompute). All of the cross group's peers sit on other nodes."""
        mine = dist.get_rank(group=self.cross_group)
        for peer, (sent, received) in enumerate(zip(send_splits, recv_splits)):
            if peer != mine:
                self.sent_bytes[1] += sent * (row_bytes + routes_bytes) + received * row_bytes
                if not recomputing():
                    self.sent_bytes[1] += received * (row_bytes + routes_bytes) + sent * row_bytes

    def take_sent_bytes(self) -> tuple[int, int]:
        in_node, across = super().take_sent_bytes()
        if self.inner is not None:
            in_node += self.inner.take_sent_bytes()[0]
        return in_node, across


_GROUPS: dict[tuple, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def node_and_cross_groups(ep_ranks: list[int], node_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's node group (the expert-parallel group's ranks on its node) and cross group (the group's ranks
    with its local index, one per node). Every rank makes every such group of the world once (torch's rule for
    new groups), for all layers; DeepSpeed's expert-parallel groups are blocks of ep_size consecutive ranks, which
    must hold whole nodes."""
    world, ep_size = dist.get_world_size(), len(ep_ranks)
    if ep_size % node_size or ep_ranks != list(range(ep_ranks[0], ep_ranks[0] + ep_size)) or ep_ranks[0] % ep_size:
        raise ValueError(f"--dispatcher node_once needs expert-parallel groups of whole nodes: ep_size {ep_size} with "
                         f"{node_size} ranks per node (group {ep_ranks}); use an ep_size that is a multiple of "
                         f"{node_size}, or --dispatcher per_route")
    key = (id(dist.group.WORLD), world, ep_size, node_size)  # a new default group makes them afresh
    if key not in _GROUPS:
        nodes = [list(range(first, first + node_size)) for first in range(0, world, node_size)]
        crosses = [list(range(first + local, first + ep_size, node_size))
                   for first in range(0, world, ep_size) for local in range(node_size)]
        _GROUPS[key] = (dist.new_subgroups_by_enumeration(nodes)[0], dist.new_subgroups_by_enumeration(crosses)[0])
    return _GROUPS[key]
