"""The router options beyond DeepSpeed's gate (sigmoid scores, norm_topk_prob, routed scaling, the aux-loss-free bias,
the balance-loss scopes, capacity under the scored rule), each against its formula written out here."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port, launch, tiny_model

import train
from moe_models.moe.checks import moe_problems
from moe_models.moe.layer import MoEFeedForward
from moe_models.moe.model_layers import MoELayers
from moe_models.run.config import ConfigError, MoEConfig

DIM, FFN, E = 64, 96, 4


def layer(seed=3, **options) -> MoEFeedForward:
    """A grouped MoE layer with distinct random experts and a router strong enough to route unevenly."""
    ffn = tiny_model(hidden_size=DIM, intermediate_size=FFN).model.layers[0].mlp
    cfg = MoEConfig(num_experts=E, top_k=options.pop("top_k", 2), drop_tokens=options.pop("drop_tokens", False),
                    **options)
    moe = MoEFeedForward(ffn, DIM, E, cfg).train()
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in moe.moe.parameters():
            param.normal_(0, 0.3)
    return moe


def expert_outputs(moe: MoEFeedForward, x_TD: torch.Tensor) -> torch.Tensor:
    """[E, T, D]: every expert's SwiGLU FFN on every token, from its weights."""
    outputs = []
    for w in moe.local_expert_weights():
        hidden = F.silu(x_TD @ w["gate_proj.weight"].t()) * (x_TD @ w["up_proj.weight"].t())
        outputs.append(hidden @ w["down_proj.weight"].t())
    return torch.stack(outputs)


def reference(moe: MoEFeedForward, x_TD, score, k, renormalise, scale, bias=None):
    """The scored rule from its definition: s = score(x W^T); experts = top-k of s (+ bias); weights = chosen s,
    rescaled to sum to 1 if asked, times the scale; output = sum of the weighted expert outputs."""
    s_TE = score(x_TD @ moe.router.wg.weight.t())
    ids_TK = (s_TE if bias is None else s_TE + bias).topk(k, dim=1).indices
    w_TK = s_TE.gather(1, ids_TK)
    if renormalise:
        w_TK = w_TK / w_TK.sum(dim=1, keepdim=True)
    w_TK = w_TK * scale
    y_ETD = expert_outputs(moe, x_TD)
    out_TD = torch.stack([sum(w_TK[t, j] * y_ETD[ids_TK[t, j], t] for j in range(k)) for t in range(len(x_TD))])
    return out_TD, ids_TK, w_TK


@pytest.mark.parametrize("score_function,norm,k,scale", [("sigmoid", True, 2, 2.5), ("sigmoid", False, 3, 1.0),
                                                          ("softmax", False, 2, 1.0), ("softmax", True, 1, 1.0)])
def test_scored_rule_follows_its_definition(score_function, norm, k, scale):
    moe = layer(score_function=score_function, norm_topk_prob=norm, top_k=k, routed_scaling_factor=scale)
    x_TD = torch.randn(24, DIM)
    score = torch.sigmoid if score_function == "sigmoid" else (lambda l: l.softmax(dim=1))
    expected, ids_TK, w_TK = reference(moe, x_TD, score, k, norm, scale)
    out = moe(x_TD.unsqueeze(0)).squeeze(0)
    routes = moe.router.route(x_TD)
    assert torch.equal(routes.topk_ids_TK, ids_TK)
    torch.testing.assert_close(routes.weights_TK, w_TK)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_bias_steers_the_choice_but_not_the_weights():
    moe = layer(score_function="sigmoid", router_bias_update_rate=1e-3)
    with torch.no_grad():
        moe.router.score_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 10.0]))  # experts 0 and 3 win every choice
    x_TD = torch.randn(16, DIM)
    expected, ids_TK, w_TK = reference(moe, x_TD, torch.sigmoid, 2, True, 1.0, bias=moe.router.score_bias)
    routes = moe.router.route(x_TD)
    assert set(routes.topk_ids_TK.flatten().tolist()) == {0, 3}
    scores_TE = torch.sigmoid(x_TD @ moe.router.wg.weight.t())  # unbiased scores, rescaled over the two chosen
    chosen_TK = scores_TE[:, [0, 3]]
    torch.testing.assert_close(routes.weights_TK.sort(dim=1).values,
                               (chosen_TK / chosen_TK.sum(dim=1, keepdim=True)).sort(dim=1).values)
    torch.testing.assert_close(moe(x_TD.unsqueeze(0)).squeeze(0), expected, rtol=1e-5, atol=1e-5)


def test_bias_update_is_the_sign_of_the_load_gap_and_stays_fp32():
    moe = layer(router_bias_update_rate=0.01, score_function="sigmoid")
    x_TD = torch.randn(2, 16, DIM)
    loads = torch.zeros(E)
    for micro_step in range(2):  # the load of the whole step counts, over its micro-steps
        moe(x_TD[micro_step:micro_step + 1])
        chosen = torch.sigmoid(x_TD[micro_step] @ moe.router.wg.weight.t()).topk(2, dim=1).indices  # the bias is 0
        loads += torch.bincount(chosen.flatten(), minlength=E)
    MoELayers(moe).after_optimizer_step(applied=True)  # the router's own rate, 0.01
    expected = 0.01 * torch.sign(loads.mean() - loads)
    assert torch.equal(moe.router.score_bias, expected) and expected.abs().sum() > 0
    MoELayers(moe).after_optimizer_step(applied=False)  # a skipped step (and no forward) moves nothing
    assert torch.equal(moe.router.score_bias, expected)
    assert moe.bfloat16().router.score_bias.dtype == torch.float32  # a bf16 engine keeps the bias exact
    assert "moe.deepspeed_moe.gate.score_bias" in moe.state_dict()


def switch_loss(probs_TE, ids_TK):
    """E x sum_e f_e P_e: f_e the share of routes choosing e, P_e the mean (normalised) score of e."""
    T, K = ids_TK.shape
    f_E = torch.bincount(ids_TK.flatten(), minlength=E).float() / (T * K)
    return E * (f_E * probs_TE.mean(dim=0)).sum()


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_micro_batch_and_sequence_balance_losses_follow_the_formula(score_function):
    x_BSD = torch.randn(3, 8, DIM)
    for aux_loss_type in ("micro_batch", "sequence"):
        moe = layer(score_function=score_function, aux_loss_type=aux_loss_type, norm_topk_prob=True)
        moe(x_BSD)
        s_BSE = x_BSD @ moe.router.wg.weight.t()
        s_BSE = s_BSE.sigmoid() if score_function == "sigmoid" else s_BSE.softmax(dim=-1)
        probs_BSE = s_BSE / s_BSE.sum(dim=-1, keepdim=True)
        ids_BSK = s_BSE.topk(2, dim=-1).indices
        if aux_loss_type == "micro_batch":
            expected = switch_loss(probs_BSE.reshape(-1, E), ids_BSK.reshape(-1, 2))
        else:
            expected = torch.stack([switch_loss(probs_BSE[b], ids_BSK[b]) for b in range(3)]).mean()
        torch.testing.assert_close(moe.balance_loss, expected, rtol=1e-5, atol=1e-6)
        # the gradient reaches the router through P
        moe.balance_loss.backward()
        assert moe.router.wg.weight.grad.abs().sum() > 0


def test_capacity_keeps_each_experts_highest_weighted_routes():
    moe = layer(drop_tokens=True, capacity_factor=0.5, min_capacity=1, score_function="sigmoid")
    x_TD = torch.randn(32, DIM)
    unlimited = layer(score_function="sigmoid").router.route(x_TD)  # same seed: same router
    routes = moe.router.route(x_TD)
    capacity = math.ceil(32 * 2 * 0.5 / E)
    assert torch.equal(routes.chosen_E, unlimited.chosen_E)
    for e in range(E):
        weights = unlimited.weights_TK[unlimited.topk_ids_TK == e]
        kept = routes.weights_TK[routes.topk_ids_TK == e]
        assert len(kept) == min(capacity, len(weights)) == routes.kept_E[e]
        torch.testing.assert_close(kept.sort().values, weights.sort().values[-len(kept):])
    assert (routes.weights_TK[routes.topk_ids_TK < 0] == 0).all() and (routes.topk_ids_TK < 0).any()


def _global_batch_rank(rank: int, port: int, inputs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        moe = layer(aux_loss_type="global_batch", norm_topk_prob=True)
        weight = moe.router.wg.weight.detach()
        routes_so_far = torch.zeros(E)
        for micro_step in range(2):  # f over both ranks and the micro-steps so far; P over this rank's tokens
            moe(inputs[micro_step][rank].unsqueeze(0))
            for r in range(2):
                scores = (inputs[micro_step][r] @ weight.t()).softmax(dim=1)
                routes_so_far += torch.bincount(scores.topk(2, dim=1).indices.flatten(), minlength=E)
            probs = (inputs[micro_step][rank] @ weight.t()).softmax(dim=1)
            expected = E * (routes_so_far / routes_so_far.sum() * probs.mean(dim=0)).sum()
            torch.testing.assert_close(moe.balance_loss, expected, rtol=1e-5, atol=1e-6)
        MoELayers(moe).after_optimizer_step(applied=True)  # the next step counts afresh
        moe(inputs[0][rank].unsqueeze(0))
        probs = (inputs[0][rank] @ weight.t()).softmax(dim=1)
        fresh = torch.zeros(E)
        for r in range(2):
            fresh += torch.bincount((inputs[0][r] @ weight.t()).topk(2, dim=1).indices.flatten(), minlength=E)
        torch.testing.assert_close(moe.balance_loss, E * (fresh / fresh.sum() * probs.mean(dim=0)).sum(),
                                   rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_global_batch_loss_counts_every_rank_and_micro_step():
    torch.manual_seed(0)
    inputs = [[torch.randn(12, DIM) * (1 + r) for r in range(2)] for _ in range(2)]  # [micro-step][rank]
    mp.spawn(_global_batch_rank, args=(free_port(), inputs), nprocs=2)


@pytest.mark.parametrize("flags,wanted,fixed", [
    (dict(score_function="sigmoid", moe_impl="deepspeed"), "use --moe_impl grouped", dict(moe_impl="grouped")),
    (dict(aux_loss_type="sequence", moe_impl="deepspeed"), "--aux_loss_type sequence", dict(moe_impl="grouped")),
    (dict(router_bias_update_rate=1e-3, noisy_gate_policy="RSample"), "RSample", dict(noisy_gate_policy="Jitter")),
    (dict(router_bias_update_rate=-1.0), "must be >= 0", dict(router_bias_update_rate=1e-3)),
    (dict(routed_scaling_factor=0.0), "must be > 0", dict(routed_scaling_factor=2.5)),
    (dict(score_function="tanh"), "'softmax' or 'sigmoid'", dict(score_function="sigmoid")),
])
def test_bad_settings_are_refused_with_the_way_out(flags, wanted, fixed):
    problems = moe_problems(MoEConfig(**flags))
    assert any(wanted in p for p in problems), problems
    assert moe_problems(MoEConfig(**{**flags, **fixed})) == []  # the way out the message gives works


def test_defaults_keep_deepspeeds_rules():
    assert moe_problems(MoEConfig()) == []
    assert layer().router.scoring.is_deepspeed
    with pytest.raises(ConfigError):
        from moe_models.moe.surgery import convert_to_moe
        convert_to_moe(tiny_model(), MoEConfig(score_function="sigmoid", moe_impl="deepspeed"))


RUN = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--eval_steps", "0",
       "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--per_device_train_batch_size", "2",
       "--logging_steps", "1", "--gradient_accumulation_steps", "2", "--score_function", "sigmoid",
       "--norm_topk_prob", "true", "--routed_scaling_factor", "2.5", "--router_bias_update_rate", "0.01",
       "--aux_loss_type", "global_batch", "--drop_tokens", "false", "--expert_groups", "2", "--max_groups_per_token",
       "1"]


def logged(output_dir, *keys):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [[r[key] for key in keys] for r in rows if "loss" in r]


def test_a_run_with_every_option_resumes_exactly(world, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main([*RUN, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(full)])
    train.main([*RUN, "--max_steps", "4", "--output_dir", str(resumed),
                "--resume_from_checkpoint", str(full / "checkpoints" / "global_step2")])
    keys = ("loss", "aux_loss", "moe/layer_0/score_bias", "moe/layer_1/routed_per_expert")
    rows = logged(full, *keys)
    assert any(bias != [0.0] * 4 for _, _, bias, _ in rows)  # the bias moved
    # top-2 inside the best of 2 groups of 2 experts: every token takes both experts of one group
    assert all(load[0] == load[1] and load[2] == load[3] for _, _, _, load in rows)
    assert logged(resumed, *keys) == rows[2:]


@pytest.mark.distributed
def test_every_option_at_ep2_equals_ep1(tmp_path):
    """Two ranks each time: data parallel (ep_size 1) and expert parallel (ep_size 2); the biases and the
    global-batch loss are counted over both ranks either way."""
    for ep in (1, 2):
        launch(["train.py", "--ep_size", str(ep), *RUN, "--max_steps", "3", "--output_dir", str(tmp_path / f"ep{ep}")])
    keys = ("loss", "aux_loss", "moe/layer_0/score_bias", "moe/layer_3/score_bias", "moe/layer_2/routed_per_expert")
    ep1, ep2 = logged(tmp_path / "ep1", *keys), logged(tmp_path / "ep2", *keys)
    assert len(ep1) == 3 and any(bias != [0.0] * 4 for _, _, bias, _, _ in ep1)
    for row1, row2 in zip(ep1, ep2):
        assert row2[:2] == pytest.approx(row1[:2], rel=1e-5)
        assert row2[2:] == row1[2:]
    # each step's logged load of layer 0 is both ranks' routes of that step: the bias follows it by the formula
    bias = torch.zeros(4)
    for (load,), (logged_bias,) in zip(logged(tmp_path / "ep2", "moe/layer_0/routed_per_expert"),
                                       logged(tmp_path / "ep2", "moe/layer_0/score_bias")):
        load = torch.tensor(load, dtype=torch.float64)
        bias += 0.01 * torch.sign(load.mean() - load).float()
        assert logged_bias == pytest.approx(bias.tolist(), abs=1e-7)
