"""Group-limited routing (--expert_groups, --max_groups_per_token) against the rule written out, against stock
transformers' GLM4-MoE router, and its refusals."""

import pytest
import torch
from transformers import AutoConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from moe_models.moe.checks import group_problems
from moe_models.moe.layer import MoEFeedForward
from moe_models.moe.router import within_best_groups
from moe_models.run.config import MoEConfig


def test_a_token_keeps_its_best_groups_by_their_two_best_scores():
    # 6 experts in 3 groups of 2; group sums of the two best: [0.9 + 0.1, 0.5 + 0.5, 0.8 + 0.0] = [1.0, 1.0, 0.8]
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.8, 0.0]])
    kept = within_best_groups(scores, groups=3, keep=2)
    inf = float("-inf")
    # expert 4 (0.8, the second best score) is out: its group sums 0.8
    assert torch.equal(kept, torch.tensor([[0.9, 0.1, 0.5, 0.5, inf, inf]]))
    assert torch.equal(within_best_groups(scores, groups=3, keep=3), scores)  # every group: no limit


@torch.no_grad()
def test_routes_equal_stock_glm4_moe_router(world):
    """The scored rule with sigmoid scores, the bias and group limits chooses and weighs as transformers' router."""
    E, groups, keep, k, D = 8, 4, 2, 3, 16
    moe = MoEConfig(num_experts=E, top_k=k, score_function="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                    router_bias_update_rate=0.01, expert_groups=groups, max_groups_per_token=keep, drop_tokens=False)
    layer = MoEFeedForward(torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.ReLU(), torch.nn.Linear(32, D)),
                           hidden_size=D, num_experts=E, cfg=moe).eval()
    torch.manual_seed(0)
    layer.router.wg.weight.normal_(0, 1.0)
    layer.router.score_bias.normal_(0, 0.1)
    config = AutoConfig.for_model("glm4_moe", hidden_size=D, n_routed_experts=E, num_experts_per_tok=k, n_group=groups,
                                  topk_group=keep, norm_topk_prob=True, routed_scaling_factor=2.5)
    stock = Glm4MoeTopkRouter(config)
    stock.weight.copy_(layer.router.wg.weight)
    stock.e_score_correction_bias.copy_(layer.router.score_bias)
    x = torch.randn(64, D)
    ours = layer.router.route(x)
    _, weights, ids = stock(x)
    order, stock_order = ours.topk_ids_TK.sort(dim=1), ids.sort(dim=1)
    assert torch.equal(order.values, stock_order.values)
    torch.testing.assert_close(ours.weights_TK.gather(1, order.indices), weights.gather(1, stock_order.indices))
    # the limit matters on these tokens: without it some would choose outside their best groups
    unlimited = MoEConfig(**{**moe.__dict__, "max_groups_per_token": None})
    free = MoEFeedForward(torch.nn.Linear(D, D), hidden_size=D, num_experts=E, cfg=unlimited).eval()
    free.router.wg.weight.copy_(layer.router.wg.weight)
    free.router.score_bias.copy_(layer.router.score_bias)
    assert not torch.equal(free.router.route(x).topk_ids_TK.sort(dim=1).values, order.values)


@pytest.mark.parametrize("settings, message", [
    (dict(num_experts=6, expert_groups=4, max_groups_per_token=2), "choose a divisor of the experts"),
    (dict(num_experts=4, expert_groups=4, max_groups_per_token=2), "at least 2"),
    (dict(num_experts=8, expert_groups=4, max_groups_per_token=5), "between 1 and expert_groups (4)"),
    (dict(num_experts=8, top_k=6, expert_groups=4, max_groups_per_token=2), "raise --max_groups_per_token"),
    (dict(num_experts=8, max_groups_per_token=1), "needs --expert_groups > 1"),
])
def test_groups_that_cannot_work_are_refused(settings, message):
    assert any(message in problem for problem in group_problems(MoEConfig(**settings)))
    assert not group_problems(MoEConfig(num_experts=8, top_k=4, expert_groups=4, max_groups_per_token=2))
