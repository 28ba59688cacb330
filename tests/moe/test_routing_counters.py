"""Routing counters on hand-made routings through real layers: counts, drops, entropy, imbalance, aux loss, expert
similarity, routes per (domain, expert) at eval."""

import math
from dataclasses import fields

import pytest
import torch

from moe_models.metrics.routing import mean_pairwise_cosine, routing_metrics
from moe_models.metrics.specialisation import mutual_information_bits
from moe_models.moe.counters import RoutingCounters, RoutingSums
from moe_models.moe.domain_routing import DomainRouteCounts
from moe_models.moe.layer import MoEFeedForward
from moe_models.moe.router import Routes, routes_per_expert
from moe_models.run.config import MoEConfig

# Eight tokens, four experts: each token's (first, second) choice. The router below is the identity
# scaled by 10 and token s is 1.0 * e_first + 0.5 * e_second, so its logits are 10 and 5 at those
# experts and 0 elsewhere.
CHOICES = [(0, 1), (0, 2), (0, 1), (1, 0), (2, 3), (0, 3), (1, 2), (2, 0)]


def entropy_of(logits: list[float]) -> float:
    exps = [math.exp(v) for v in logits]
    probs = [e / sum(exps) for e in exps]
    return -sum(p * math.log(p) for p in probs)


def routed_layer(top_k: int, capacity_factor: float | None, moe_impl: str = "grouped") -> MoEFeedForward:
    """capacity_factor None: dropless."""
    cfg = MoEConfig(num_experts=4, top_k=top_k, capacity_factor=capacity_factor or 1.0, min_capacity=0,
                    use_rts=False, top2_2nd_expert_sampling=False, drop_tokens=capacity_factor is not None,
                    moe_impl=moe_impl)
    layer = MoEFeedForward(torch.nn.Linear(4, 4), hidden_size=4, num_experts=4, cfg=cfg).train()
    with torch.no_grad():
        layer.router.wg.weight.copy_(10 * torch.eye(4))
    return layer


def hand_made_routes(topk_ids_TK: torch.Tensor, chosen_E: torch.Tensor, balance_loss: float) -> Routes:
    """Routes of uniform (zero) logits with the given choices (-1: dropped) and counts before drops."""
    return Routes(torch.zeros(topk_ids_TK.shape[0], 4), topk_ids_TK, torch.ones(topk_ids_TK.shape), chosen_E,
                  routes_per_expert(topk_ids_TK, 4), torch.tensor(balance_loss))


def hand_made_tokens() -> torch.Tensor:
    x = torch.zeros(1, len(CHOICES), 4)
    for s, (first, second) in enumerate(CHOICES):
        x[0, s, first], x[0, s, second] = 1.0, 0.5
    return x


def test_kept_routes_count_each_expert_and_skip_dropped_routes():
    topk_ids_TK = torch.tensor([[0, 1, -1, 2], [3, -1, -1, 0]]).t()
    assert routes_per_expert(topk_ids_TK, 4).tolist() == [2, 1, 1, 1]


@pytest.mark.parametrize("top_k, capacity_factor, kept, chosen", [
    # top-1, capacity ceil(8/4 * 1.0) = 2: expert 0 is chosen by 4 tokens and keeps 2.
    (1, 1.0, [2, 2, 2, 0], [4, 2, 2, 0]),
    # top-2, capacity ceil(8/4 * 0.75 * 2) = 3. First choices fill each expert's slots in token order, then
    # second choices queue behind all first choices of that expert: expert 0 keeps 3 of its 4 first
    # choices and none of its 2 second choices; expert 1 keeps both firsts and 1 of 2 seconds (tokens 0, 2);
    # expert 2 likewise (tokens 1, 6); expert 3 keeps its 2 second choices.
    (2, 0.75, [3, 3, 3, 2], [6, 4, 4, 2]),
    (2, None, [6, 4, 4, 2], [6, 4, 4, 2]),  # dropless: every route kept
])
@pytest.mark.parametrize("moe_impl", ["deepspeed", "grouped"])
def test_real_layer_counts_a_known_routing(world, top_k, capacity_factor, kept, chosen, moe_impl):
    layer = routed_layer(top_k, capacity_factor, moe_impl)
    layer(hand_made_tokens())
    metrics = routing_metrics(layer.routing.sums(torch.device("cpu")), 4, top_k)
    routes = len(CHOICES) * top_k
    assert metrics["tokens_per_expert"] == kept
    assert metrics["routed_per_expert"] == chosen
    assert metrics["routed_tokens"] == len(CHOICES)
    assert metrics["dropped"] == routes - sum(kept)
    assert metrics["drop_fraction"] == pytest.approx((routes - sum(kept)) / routes)
    assert metrics["imbalance"] == pytest.approx(max(chosen) / (routes / 4))
    assert metrics["router_entropy"] == pytest.approx(entropy_of([10, 5, 0, 0]), rel=1e-6)
    assert metrics["z_loss"] == pytest.approx(math.log(sum(math.exp(v) for v in [10, 5, 0, 0])) ** 2, rel=1e-6)
    assert metrics["router_logit_norm"] == pytest.approx(math.sqrt(10 ** 2 + 5 ** 2), rel=1e-6)
    shares = [n / routes for n in chosen]
    assert metrics["effective_experts"] == pytest.approx(math.exp(-sum(p * math.log(p) for p in shares if p)))
    assert metrics["aux_loss"] == pytest.approx(layer.balance_loss.item())
    assert metrics["max_violation_micro_batch"] == pytest.approx(max(chosen) / (routes / 4) - 1)  # one forward
    assert "max_violation_step" not in metrics  # no optimizer step has ended


def test_counters_add_up_training_forwards_only_and_reset(world):
    layer = routed_layer(top_k=2, capacity_factor=0.75)
    layer(hand_made_tokens())
    layer(hand_made_tokens())
    layer.eval()
    layer(hand_made_tokens())  # eval forwards are not counted
    metrics = routing_metrics(layer.routing.sums(torch.device("cpu")), 4, 2)
    assert metrics["tokens_per_expert"] == [6, 6, 6, 4] and metrics["routed_tokens"] == 16
    assert isinstance(layer.routing.sums(torch.device("cpu")).kept_E, torch.Tensor)  # on the device until read
    layer.routing.reset()
    assert routing_metrics(layer.routing.sums(torch.device("cpu")), 4, 2) == {}


def test_counts_of_two_ranks_sum_to_the_whole():
    """What the trainer's all-reduce does: per-rank partials over all experts add up."""
    ranks = [RoutingCounters(4), RoutingCounters(4)]
    ranks[0].add(hand_made_routes(torch.tensor([[0, 0, 1], [2, -1, 3]]).t(), torch.tensor([2, 1, 1, 2]), 1.0))
    ranks[1].add(hand_made_routes(torch.tensor([[3, 3, 3], [-1, -1, 0]]).t(), torch.tensor([1, 0, 0, 5]), 3.0))
    first, second = (counters.sums(torch.device("cpu")) for counters in ranks)
    summed = RoutingSums(**{f.name: getattr(first, f.name) + getattr(second, f.name) for f in fields(RoutingSums)})
    metrics = routing_metrics(summed, num_experts=4, top_k=2)
    # MaxVio of each rank's micro-batch (chosen [2, 1, 1, 2] and [1, 0, 0, 5]), averaged
    assert metrics["max_violation_micro_batch"] == pytest.approx(((2 / 1.5 - 1) + (5 / 1.5 - 1)) / 2)
    assert metrics["tokens_per_expert"] == [3, 1, 1, 4]
    assert metrics["routed_tokens"] == 6 and metrics["dropped"] == 3
    assert sum(metrics["tokens_per_expert"]) == metrics["routed_tokens"] * 2 - metrics["dropped"]
    assert metrics["router_entropy"] == pytest.approx(math.log(4))  # zero logits: a uniform router
    assert metrics["imbalance"] == pytest.approx(7 / 3)
    assert metrics["aux_loss"] == pytest.approx(2.0)


def test_expert_similarity_of_a_real_layer(world):
    layer = routed_layer(top_k=2, capacity_factor=1.0)
    assert mean_pairwise_cosine(float(layer.expert_direction_sum_sq()), 4) == pytest.approx(1.0)  # copies of one FFN
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_()
    flat = torch.stack([torch.cat([w.flatten() for w in e.values()]) for e in layer.local_expert_weights()]).double()
    cosine = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    expected = cosine[torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)].mean().item()
    assert mean_pairwise_cosine(float(layer.expert_direction_sum_sq()), 4) == pytest.approx(expected, rel=1e-6)
    in_chunks = float(layer.expert_direction_sum_sq(chunk_elements=3))
    assert in_chunks == pytest.approx(float(layer.expert_direction_sum_sq()), rel=1e-6)


@pytest.mark.parametrize("moe_impl", ["deepspeed", "grouped"])
def test_real_layers_count_their_routes_per_domain_over_batches(world, moe_impl):
    layer = routed_layer(top_k=2, capacity_factor=None, moe_impl=moe_impl).eval()
    domain_ids_BS = torch.tensor([[0, 0, 1, 1, 2, 2, -1, 0]])
    counts = DomainRouteCounts([layer], num_domains=3, device=torch.device("cpu"))
    for _ in range(2):  # two eval batches
        layer(hand_made_tokens())
        counts.add(domain_ids_BS)
    expected = [[0] * 4 for _ in range(3)]
    for (first, second), domain in zip(CHOICES, domain_ids_BS[0].tolist()):
        if domain >= 0:
            expected[domain][first] += 2
            expected[domain][second] += 2
    row = counts.metrics()
    assert row["moe/layer_0/domain_expert_counts"] == expected
    assert row["moe/layer_0/domain_mutual_information"] == pytest.approx(mutual_information_bits(expected))


def test_nothing_is_counted_without_moe_layers_or_domains(world):
    assert DomainRouteCounts([], num_domains=3, device=torch.device("cpu")).metrics() == {}
    layer = routed_layer(top_k=2, capacity_factor=None)
    counts = DomainRouteCounts([layer], num_domains=0, device=torch.device("cpu"))
    layer(hand_made_tokens())
    counts.add(torch.zeros(1, 8, dtype=torch.long))
    assert counts.metrics() == {}


def test_max_violation_of_the_last_step_over_ranks():
    """MaxVio of the global batch: the interval's last optimizer step, its micro-batches and ranks summed."""
    ranks = [RoutingCounters(4), RoutingCounters(4)]
    ids = torch.tensor([[0, 1], [2, 3]])
    for counters, steps in zip(ranks, [[[4, 0, 0, 0]], [[0, 2, 0, 0]]]):
        for chosen in steps:  # step 1: not the last, ignored
            counters.add(hand_made_routes(ids, torch.tensor(chosen), 0.0))
        counters.end_step()
    ranks[0].add(hand_made_routes(ids, torch.tensor([1, 1, 0, 0]), 0.0))  # step 2, two micro-batches on rank 0
    ranks[0].add(hand_made_routes(ids, torch.tensor([1, 0, 2, 0]), 0.0))
    ranks[1].add(hand_made_routes(ids, torch.tensor([0, 0, 0, 3]), 0.0))
    for counters in ranks:
        counters.end_step()
    first, second = (counters.sums(torch.device("cpu")) for counters in ranks)
    summed = RoutingSums(**{f.name: getattr(first, f.name) + getattr(second, f.name) for f in fields(RoutingSums)})
    metrics = routing_metrics(summed, num_experts=4, top_k=2)
    step_load = [2, 1, 2, 3]  # step 2 over both ranks
    assert metrics["max_violation_step"] == pytest.approx(max(step_load) / (sum(step_load) / 4) - 1)
    micro = [[4, 0, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 3]]
    assert metrics["max_violation_micro_batch"] == pytest.approx(
        sum(max(load) / (sum(load) / 4) - 1 for load in micro) / len(micro))
