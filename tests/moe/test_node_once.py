"""--dispatcher node_once on 4 CPU ranks as 2 nodes x 2 (LOCAL_WORLD_SIZE=2, as a launcher announces it): the same
outputs and gradients as the per-route dispatcher and as each token's weighted sum of its experts written out here,
and the bytes each sends inside and across nodes, counted here from the routing table."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, tiny_model

from moe_models.moe.checks import moe_problems
from moe_models.moe.dispatcher import AllToAllDispatcher
from moe_models.moe.layer import MoEFeedForward
from moe_models.moe.node_once import NodeOnceDispatcher
from moe_models.moe.routes import Routes, routes_per_expert
from moe_models.run.config import MoEConfig
from moe_models.training.node_once_bytes import node_once_bytes, nodes_per_token
from moe_models.training.preflight import ModelShape, Setup, all_to_all_bytes_per_step
from moe_models.training.step_time import all_to_all_split

RANKS, NODE, E, D = 4, 2, 8, 8
L = E // RANKS  # experts per rank; node 0 holds experts 0-3 (ranks 0, 1), node 1 experts 4-7 (ranks 2, 3)
# every rank routes its 6 tokens so: one node, the other, both, two ranks of one node
FIXED_IDS = [[0, 1], [4, 5], [4, 6], [1, 7], [6, 7], [3, 2]]


def sent_bytes_written_out(ids_by_rank, k, row_bytes, node_once):
    """(in node, across) bytes each rank sends in one training forward and backward, counted from the routes alone.
    per_route: each route's row goes to its expert's rank and comes back (the backward the same). node_once: a token
    goes once to each other node it needs, to the rank with its local index, with 2 k fp32 route values, and one row
    comes back (the backward the other way round); that relay sends each route to its expert's rank in the node."""
    rank_of = lambda e: e // L  # noqa: E731
    node_of = lambda rank: rank // NODE  # noqa: E731
    sent = [[0, 0] for _ in range(RANKS)]
    for home, ids in enumerate(ids_by_rank):
        for token in ids:
            if not node_once:
                for e in token:
                    if rank_of(e) != home:  # the row out and its output back: both ranks send one row each pass
                        for rank in (home, rank_of(e)):
                            sent[rank][node_of(rank_of(e)) != node_of(home)] += 2 * row_bytes
                continue
            for node in {node_of(rank_of(e)) for e in token}:
                relay = node * NODE + home % NODE
                if relay != home:  # row + routes out and the sum back, forward and backward
                    sent[home][1] += 2 * row_bytes + 2 * k * 4
                    sent[relay][1] += 2 * row_bytes + 2 * k * 4
                for e in token:
                    if node_of(rank_of(e)) == node and rank_of(e) != relay:
                        sent[relay][0] += 2 * row_bytes
                        sent[rank_of(e)][0] += 2 * row_bytes
    return [tuple(s) for s in sent]


def _run(dispatcher, weight_ELDD, x_TD, ids_TK, weights_TK, grad_TD):
    """One forward and backward through ``dispatcher`` with experts tanh(x W_e): (out, x grad, weight grads, local
    expert grads, the bytes it counted)."""
    x_TD, weights_TK = x_TD.clone().requires_grad_(), weights_TK.clone().requires_grad_()
    local_LDD = weight_ELDD.clone().requires_grad_()
    counts = routes_per_expert(ids_TK, E)
    routes = Routes(None, ids_TK, weights_TK, counts, counts, None)
    x_ND, counts_L, state = dispatcher.dispatch(x_TD, routes)
    y_ND = torch.cat([torch.tanh(rows @ local_LDD[i]) for i, rows in enumerate(x_ND.split(counts_L.tolist()))])
    out_TD = dispatcher.weighted_combine(y_ND, state, weights_TK)
    (out_TD * grad_TD).sum().backward()
    return out_TD.detach(), x_TD.grad, weights_TK.grad, local_LDD.grad, dispatcher.take_sent_bytes()


def _rank(rank: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(NODE))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        weight_EDD = torch.randn(E, D, D, generator=torch.Generator().manual_seed(0))
        local_LDD = weight_EDD[rank * L:(rank + 1) * L]
        gen = torch.Generator().manual_seed(rank + 1)
        dispatchers = {name: cls(L, RANKS) for name, cls in
                       (("per_route", AllToAllDispatcher), ("node_once", NodeOnceDispatcher))}
        for dispatcher in dispatchers.values():
            dispatcher.ep_group = dist.group.WORLD

        # a fixed routing: results and gradients equal, bytes as counted from the table
        ids_TK = torch.tensor(FIXED_IDS)
        T, K = ids_TK.shape
        x_TD, grad_TD = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
        weights_TK = torch.rand(T, K, generator=gen)
        runs = {name: _run(d, local_LDD, x_TD, ids_TK, weights_TK, grad_TD) for name, d in dispatchers.items()}
        expected = torch.stack([sum(weights_TK[t, k] * torch.tanh(x_TD[t] @ weight_EDD[ids_TK[t, k]])
                                    for k in range(K)) for t in range(T)])
        for name, run in runs.items():
            torch.testing.assert_close(run[0], expected, rtol=1e-6, atol=1e-6, msg=name)
        for per_route, node_once in zip(runs["per_route"][:4], runs["node_once"][:4]):
            torch.testing.assert_close(node_once, per_route, rtol=1e-6, atol=1e-6)
        for name, run in runs.items():
            assert run[4] == sent_bytes_written_out([FIXED_IDS] * RANKS, K, D * 4, name == "node_once")[rank], name
        if rank == 0:  # by hand: 7 routes out and 6 in across, 2 out and 3 in inside; node_once: 4 rows out, 3 in
            assert runs["per_route"][4] == (2 * (2 + 3) * 32, 2 * (7 + 6) * 32)
            assert runs["node_once"][4][1] == (4 + 3) * (2 * 32 + 2 * 2 * 4) < runs["per_route"][4][1]

        # node-limited routing, groups = nodes: across-node bytes fall with M (with per_route they would not)
        across = {}
        for m in (1, 2):
            cfg = MoEConfig(num_experts=E, top_k=4, expert_groups=2, max_groups_per_token=m)
            router = MoEFeedForward(tiny_model(hidden_size=D, intermediate_size=16).model.layers[0].mlp, D, E,
                                    cfg).router
            torch.manual_seed(7)
            torch.nn.init.normal_(router.wg.weight, 0, 1.0)
            x_TD = torch.randn(32, D, generator=gen)
            routes = router.route(x_TD, 32)
            ids_TK, weights_TK = routes.topk_ids_TK, routes.weights_TK.detach()
            grad_TD = torch.randn(32, D, generator=gen)
            runs = {name: _run(d, local_LDD, x_TD, ids_TK, weights_TK, grad_TD) for name, d in dispatchers.items()}
            for per_route, node_once in zip(runs["per_route"][:4], runs["node_once"][:4]):
                torch.testing.assert_close(node_once, per_route, rtol=1e-6, atol=1e-6)
            all_ids = [None] * RANKS
            dist.all_gather_object(all_ids, ids_TK.tolist())
            assert runs["node_once"][4] == sent_bytes_written_out(all_ids, 4, D * 4, True)[rank]
            if m == 1:
                assert all(len({e // (E // 2) for e in token}) == 1 for ids in all_ids for token in ids)
            across[m] = torch.tensor(float(runs["node_once"][4][1]))
            dist.all_reduce(across[m])
        assert across[1] < across[2]

        # --benchmark_balanced_routing's routes (token t on experts (t k + j) mod E), 2 sequences of 6 tokens, top-3:
        # the plan's counts (either dispatcher) are the mean of the ranks' counts
        ids_TK = (torch.arange(12 * 3) % E).view(12, 3)
        x_TD, grad_TD, weights_TK = (torch.randn(12, n, generator=gen) for n in (D, D, 3))
        counted = {name: torch.tensor(_run(d, local_LDD, x_TD, ids_TK, weights_TK, grad_TD)[4], dtype=torch.float64)
                   for name, d in dispatchers.items()}
        for sums in counted.values():
            dist.all_reduce(sums)
        setup = Setup(world_size=RANKS, ep_size=RANKS, zero_stage=0, bf16=False, offload_optimizer=False,
                      micro_batch=2, block_size=6, gradient_accumulation_steps=1, activation_checkpointing=False,
                      dispatcher="node_once")
        balanced = MoEConfig(num_experts=E, top_k=3, ep_size=RANKS, benchmark_balanced_routing=True)
        planned = node_once_bytes(balanced, 1, 3, D, setup, NODE)
        assert tuple((counted["node_once"] / RANKS).tolist()) == pytest.approx(planned)
        shape = ModelShape(dense_parameters=0, expert_parameters=0, active_parameters=0, flops_per_token=0.0,
                           num_layers=1, hidden_size=D, vocab_size=1, moe_layers=1, routes=3, routed_units=0,
                           always_on_units=0, router_outputs=E)
        per_route = all_to_all_split(all_to_all_bytes_per_step(shape, setup), RANKS, NODE)
        assert tuple((counted["per_route"] / RANKS).tolist()) == pytest.approx(per_route)
        assert planned[1] < per_route[1]
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_node_once_equals_per_route_and_crosses_each_node_once():
    # spawned, not forked: a forked rank would inherit this process's group if an earlier test made one
    mp.spawn(_rank, args=(free_port(),), nprocs=RANKS)


def test_nodes_a_token_reaches_as_the_plan_counts_them():
    # k of E experts drawn evenly: a node of E / n experts is missed with probability C(E - E/n, k) / C(E, k)
    assert nodes_per_token(8, 4, 2, tokens=1, balanced=False) == pytest.approx(2 * (1 - 1 / 70))
    assert nodes_per_token(8, 2, 4, tokens=1, balanced=False) == pytest.approx(4 * (1 - 15 / 28))
    # node-limited routing, one group per node: M = 1 reaches one node, M = 2 of 4 groups on 2 nodes at most two
    assert nodes_per_token(8, 4, 2, 1, False, expert_groups=2, max_groups=1) == 1
    assert 1 < nodes_per_token(16, 4, 4, 1, False, expert_groups=4, max_groups=2) <= 2
    # benchmark routing, 8 experts on 2 nodes, top-3: tokens 0..3 on {0,1,2} {3,4,5} {6,7,0} {1,2,3}: 1, 2, 2, 1
    assert nodes_per_token(8, 3, 2, tokens=4, balanced=True) == 1.5


def test_node_once_is_refused_on_the_stock_layer():
    problems = moe_problems(MoEConfig(dispatcher="node_once", moe_impl="deepspeed"))
    assert "--dispatcher node_once needs --moe_impl grouped (the stock layer has its own exchange)" in problems
    assert not any("dispatcher" in p for p in moe_problems(MoEConfig(dispatcher="node_once")))
