"""Padding that routing ignores (moe/padding.py): a padded batch routes, counts, balances and drops exactly as its
real tokens alone, the balance losses written out here by their formulas."""

import math

import pytest
import torch
from test_routing_counters import CHOICES, hand_made_tokens, routed_layer

from moe_models.metrics.routing import routing_metrics
from moe_models.moe.layer import MoEFeedForward
from moe_models.moe.model_layers import MoELayers
from moe_models.run.config import MoEConfig

E = 4
# The 8 hand-made tokens of test_routing_counters in two rows, 5 and 3 of them, each row padded to 8 tokens. A pad
# token's hidden state routes to expert 3 first, so counted padding would show in the loads, the balance loss and
# the capacity.
PAD = torch.tensor([0.0, 0.5, 0.0, 1.0])
ATTENTION_MASK = torch.tensor([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5])


def padded_batch() -> torch.Tensor:
    real_ND = hand_made_tokens()[0]
    x_BSD = PAD.repeat(2, 8, 1)
    x_BSD[0, :5], x_BSD[1, :3] = real_ND[:5], real_ND[5:]
    return x_BSD


def softmax_of_choices() -> torch.Tensor:
    """Each real token's router probabilities: logits 10 at its first choice, 5 at its second, 0 elsewhere."""
    logits_NE = torch.zeros(len(CHOICES), E, dtype=torch.float64)
    for t, (first, second) in enumerate(CHOICES):
        logits_NE[t, first], logits_NE[t, second] = 10.0, 5.0
    return logits_NE.softmax(dim=1)


def first_choice_balance_loss() -> float:
    """DeepSpeed's top-1 and top-2 balance loss over the real tokens: E x sum_e mean_t(p_te) x (first choices of e /
    tokens)."""
    probs_NE = softmax_of_choices()
    first_share_E = [sum(first == e for first, _ in CHOICES) / len(CHOICES) for e in range(E)]
    return E * sum(probs_NE[:, e].mean().item() * first_share_E[e] for e in range(E))


def without_padding(layer: MoEFeedForward, attention_mask_BS: torch.Tensor) -> None:
    """What a trainer does before the forward (MoELayers.ignore_padding)."""
    MoELayers(torch.nn.Sequential(layer)).ignore_padding(attention_mask_BS, torch.device("cpu"))


@pytest.mark.parametrize("top_k, capacity_factor, kept, chosen", [
    (1, 1.0, [2, 2, 2, 0], [4, 2, 2, 0]),     # capacity ceil(8 real / 4 x 1.0) = 2 (16 tokens would give 4)
    (2, 0.75, [3, 3, 3, 2], [6, 4, 4, 2]),    # capacity ceil(8 / 4 x 0.75 x 2) = 3 (with the pads: 6)
    (2, None, [6, 4, 4, 2], [6, 4, 4, 2]),    # dropless
])
@pytest.mark.parametrize("moe_impl", ["deepspeed", "grouped"])
def test_a_padded_batch_routes_counts_and_drops_as_its_real_tokens_alone(world, top_k, capacity_factor, kept,
                                                                         chosen, moe_impl):
    """Loads, drops and capacity as test_routing_counters' hand count of the same 8 tokens; the balance loss by
    its formula over them; the real tokens' outputs those of a forward of the real tokens alone; 0 at the pads."""
    layer = routed_layer(top_k, capacity_factor, moe_impl)
    without_padding(layer, ATTENTION_MASK)
    x_BSD = padded_batch()
    out_BSD = layer(x_BSD)
    metrics = routing_metrics(layer.routing.sums(torch.device("cpu")), E, top_k)
    assert metrics["routed_tokens"] == len(CHOICES)
    assert metrics["tokens_per_expert"] == kept and metrics["routed_per_expert"] == chosen
    assert metrics["dropped"] == len(CHOICES) * top_k - sum(kept)
    assert layer.balance_loss.item() == pytest.approx(first_choice_balance_loss(), rel=1e-6)
    assert metrics["z_loss"] == pytest.approx(math.log(sum(math.exp(v) for v in [10, 5, 0, 0])) ** 2, rel=1e-6)
    real = ATTENTION_MASK.bool()
    assert (layer.last_topk_ids_TK.view(2, 8, top_k)[~real] == -1).all()
    assert (out_BSD[~real] == 0).all()

    alone = routed_layer(top_k, capacity_factor, moe_impl)
    alone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out_BSD[real], alone(hand_made_tokens())[0])


def test_the_sequence_loss_and_the_bias_load_count_each_row_s_real_tokens(world):
    """--aux_loss_type sequence: E x sum_e f_be x P_be per row b over its real tokens (f_be: the row's routes to e
    over its tokens x k, P_be: its mean probability of e), averaged over the rows; the aux-loss-free bias moves by
    the real tokens' routes."""
    cfg = MoEConfig(num_experts=E, top_k=2, aux_loss_type="sequence", router_bias_update_rate=0.01,
                    use_rts=False, top2_2nd_expert_sampling=False)
    layer = MoEFeedForward(torch.nn.Linear(E, E), hidden_size=E, num_experts=E, cfg=cfg).train()
    with torch.no_grad():
        layer.router.wg.weight.copy_(10 * torch.eye(E))
    without_padding(layer, ATTENTION_MASK)
    layer(padded_batch())

    probs_NE = softmax_of_choices()
    per_row = []
    for first_token, tokens in ((0, 5), (5, 3)):
        rows_choices = CHOICES[first_token:first_token + tokens]
        f_E = [sum(e in choice for choice in rows_choices) / (tokens * 2) for e in range(E)]
        P_E = probs_NE[first_token:first_token + tokens].mean(dim=0)
        per_row.append(E * sum(f_E[e] * P_E[e].item() for e in range(E)))
    assert layer.balance_loss.item() == pytest.approx(sum(per_row) / 2, rel=1e-6)
    assert layer.router.step_load.local_E.tolist() == [6, 4, 4, 2]


def test_the_global_batch_loss_counts_the_real_tokens(world):
    """--aux_loss_type global_batch on one rank, first micro-batch: E x sum_e f_e x P_e, f_e the routes to e over
    the 8 real tokens x k, P_e the mean probability of e over them."""
    cfg = MoEConfig(num_experts=E, top_k=2, aux_loss_type="global_batch", use_rts=False,
                    top2_2nd_expert_sampling=False)
    layer = MoEFeedForward(torch.nn.Linear(E, E), hidden_size=E, num_experts=E, cfg=cfg).train()
    with torch.no_grad():
        layer.router.wg.weight.copy_(10 * torch.eye(E))
    without_padding(layer, ATTENTION_MASK)
    layer(padded_batch())
    P_E = softmax_of_choices().mean(dim=0)
    f_E = [sum(e in choice for choice in CHOICES) / (len(CHOICES) * 2) for e in range(E)]
    assert layer.balance_loss.item() == pytest.approx(E * sum(f_E[e] * P_E[e].item() for e in range(E)), rel=1e-6)


def test_no_mask_or_no_padding_routes_every_token(world):
    layer = routed_layer(2, None)
    without_padding(layer, torch.ones(2, 8, dtype=torch.long))
    assert layer.real_tokens is None
    layer(padded_batch())
    assert routing_metrics(layer.routing.sums(torch.device("cpu")), E, 2)["routed_tokens"] == 16
