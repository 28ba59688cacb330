"""Adaptive compute (moe/adaptive.py): top-p routing, null experts, the compute-target bias, the dynamic loss and the
real-expert metrics, each against its formula written out here."""

import json

import pytest
import torch
from helpers import launch
from test_scoring import DIM, E, expert_outputs, layer

import train
from moe_models.moe.adaptive import dynamic_loss, top_p_choice
from moe_models.moe.checks import moe_problems
from moe_models.moe.model_layers import MoELayers
from moe_models.run.config import MoEConfig


def test_top_p_takes_the_fewest_experts_reaching_p_between_the_bounds():
    probs_TE = torch.tensor([[0.5, 0.3, 0.1, 0.1],     # 0.5 < 0.6, then 0.8 >= 0.6: experts 0, 1
                             [0.7, 0.1, 0.1, 0.1],     # 0.7 >= 0.6 at once: expert 0 alone
                             [0.25, 0.25, 0.25, 0.25],  # ties: lower id first; 0.25, 0.5, 0.75: 3 experts = max_k
                             [0.1, 0.2, 0.3, 0.4]])    # 0.4, 0.7: experts 3, 2
    ids = top_p_choice(probs_TE, probs_TE, max_k=3, min_k=1, p=0.6)
    assert ids.tolist() == [[0, 1, -1], [0, -1, -1], [0, 1, 2], [3, 2, -1]]
    capped = top_p_choice(probs_TE, probs_TE, max_k=2, min_k=1, p=0.99)  # the most is max_k
    assert capped.tolist() == [[0, 1], [0, 1], [0, 1], [3, 2]]
    floor = top_p_choice(probs_TE, probs_TE, max_k=3, min_k=2, p=0.1)  # the fewest is min_k
    assert floor.tolist() == [[0, 1, -1], [0, 1, -1], [0, 1, -1], [3, 2, -1]]
    exact = top_p_choice(probs_TE[:1], probs_TE[:1], max_k=3, min_k=1, p=0.8)  # 0.5 + 0.3 reaches p exactly
    assert exact.tolist() == [[0, 1, -1]]


def test_top_p_layer_follows_its_definition():
    moe = layer(top_p=0.6, top_k=3)
    x_TD = torch.randn(24, DIM)
    probs_TE = (x_TD @ moe.router.wg.weight.t()).softmax(dim=1)
    out = moe(x_TD.unsqueeze(0)).squeeze(0)
    y_ETD = expert_outputs(moe, x_TD)
    expected = []
    for t in range(24):
        order = sorted(range(E), key=lambda e: (-probs_TE[t, e].item(), e))
        kept, total = [], 0.0
        for e in order[:3]:
            if kept and total >= 0.6:
                break
            kept.append(e)
            total += probs_TE[t, e].item()
        w = probs_TE[t, kept] / probs_TE[t, kept].sum()
        expected.append(sum(w[j] * y_ETD[e, t] for j, e in enumerate(kept)))
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output", ["zero", "identity"])
@pytest.mark.parametrize("drop_tokens", [False, True])
def test_null_experts_output_zero_or_their_input_and_are_not_dispatched(drop_tokens, output):
    moe = layer(num_null_experts=2, drop_tokens=drop_tokens, capacity_factor=4.0, null_expert_output=output)
    assert moe.router.wg.weight.shape == (E + 2, DIM) and moe.num_experts == E
    x_TD = torch.randn(32, DIM)
    s_TE = (x_TD @ moe.router.wg.weight.t()).softmax(dim=1)  # over the E real and 2 null outputs
    ids_TK = s_TE.topk(2, dim=1).indices
    w_TK = s_TE.gather(1, ids_TK) / s_TE.gather(1, ids_TK).sum(dim=1, keepdim=True)  # nulls share the rescaling
    y_ETD = expert_outputs(moe, x_TD)
    null_TD = x_TD if output == "identity" else torch.zeros_like(x_TD)  # a null expert's output
    expected = torch.stack([sum(w_TK[t, j] * (y_ETD[ids_TK[t, j], t] if ids_TK[t, j] < E else null_TD[t])
                                for j in range(2)) for t in range(32)])
    dispatched = []
    moe.moe.deepspeed_moe.experts.register_forward_hook(lambda module, args, out: dispatched.append(args[1].sum()))
    out = moe(x_TD.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    real_routes = int((ids_TK < E).sum())
    assert 0 < real_routes < 64 and int(dispatched[0]) == real_routes  # only real routes reach the experts
    routes = moe.router.route(x_TD)
    assert int(routes.chosen_null.sum()) == 64 - real_routes and (routes.topk_ids_TK < E).all()


def test_the_compute_target_moves_each_bias_toward_its_share():
    moe = layer(num_null_experts=2, router_bias_update_rate=0.01, null_expert_target_real_k=1.5)
    x_TD = torch.randn(16, DIM)
    moe(x_TD.unsqueeze(0))
    chosen = (x_TD @ moe.router.wg.weight.t()).softmax(dim=1).topk(2, dim=1).indices  # the bias is 0
    load = torch.bincount(chosen.flatten(), minlength=E + 2).double()
    routes = 32  # real target R K_t / (K E), null target R (1 - K_t / K) / N
    target = torch.tensor([routes * 1.5 / (2 * E)] * E + [routes * (1 - 1.5 / 2) / 2] * 2, dtype=torch.float64)
    MoELayers(moe).after_optimizer_step(applied=True)
    assert torch.equal(moe.router.score_bias, (0.01 * torch.sign(target - load)).float())
    assert moe.router.score_bias[E:].abs().sum() + moe.router.score_bias[:E].abs().sum() > 0


def test_without_a_target_the_null_biases_stay():
    moe = layer(num_null_experts=2, router_bias_update_rate=0.01)
    moe(torch.randn(1, 16, DIM))
    MoELayers(moe).after_optimizer_step(applied=True)
    assert torch.equal(moe.router.score_bias[E:], torch.zeros(2)) and moe.router.score_bias[:E].abs().sum() > 0


def test_dynamic_loss_and_its_gradient():
    logits = torch.randn(6, 5, requires_grad=True)
    loss = dynamic_loss(logits)
    P = logits.detach().softmax(dim=1)
    H = -(P * P.log()).sum(dim=1)
    torch.testing.assert_close(loss, H.mean())
    loss.backward()
    # dH/dz_j = -P_j (log P_j + H), averaged over the 6 tokens
    torch.testing.assert_close(logits.grad, -P * (P.log() + H[:, None]) / 6)
    moe = layer(top_p=0.5, top_k=3, dynamic_loss_coef=0.1)
    x = torch.randn(1, 8, DIM)
    moe(x)
    lm = torch.zeros(())
    total, _ = MoELayers(moe).router_loss(lm)
    torch.testing.assert_close(total, 0.01 * moe.balance_loss + 0.1 * dynamic_loss(x[0] @ moe.router.wg.weight.t()))


@pytest.mark.parametrize("flags,wanted,fixed", [
    (dict(num_null_experts=2, moe_impl="deepspeed"), "use --moe_impl grouped", dict(moe_impl="grouped")),
    (dict(top_p=0.5, moe_impl="deepspeed"), "use --moe_impl grouped", dict(moe_impl="grouped")),
    (dict(null_expert_output="identity"), "it needs --num_null_experts >= 1", dict(num_null_experts=2)),
    (dict(top_p=1.5), "must be in (0, 1]", dict(top_p=0.9)),
    (dict(top_p=0.5, score_function="sigmoid"), "use --score_function softmax", dict(score_function="softmax")),
    (dict(top_p=0.5, aux_loss_type="sequence"), "micro_batch", dict(aux_loss_type="micro_batch")),
    (dict(top_p=0.5, min_k=3), "between 1 and top_k", dict(min_k=2)),
    (dict(min_k=2), "only used by --top_p", dict(top_p=0.5)),
    (dict(num_null_experts=2, null_expert_target_real_k=1.5), "--router_bias_update_rate > 0",
     dict(router_bias_update_rate=1e-3)),
    (dict(num_null_experts=1, router_bias_update_rate=1e-3, null_expert_target_real_k=0.5), "must be in [1, 2)",
     dict(null_expert_target_real_k=1.5)),
    (dict(num_null_experts=2, expert_groups=2, max_groups_per_token=1), "group-limited", dict(max_groups_per_token=None)),
    (dict(num_null_experts=-1), "must be >= 0", dict(num_null_experts=0)),
])
def test_bad_adaptive_settings_are_refused_with_the_way_out(flags, wanted, fixed):
    flags = {"drop_tokens": False, **flags}
    problems = moe_problems(MoEConfig(**flags))
    assert any(wanted in p for p in problems), problems
    assert moe_problems(MoEConfig(**{**flags, **fixed})) == []


def test_real_experts_per_domain_by_hand(world):
    """Per domain: real routes (ids >= 0) over the domain's tokens; tokens without a domain (-1) are not counted."""
    from types import SimpleNamespace

    from moe_models.moe.domain_routing import DomainRouteCounts
    ids_TK = torch.tensor([[0, -1], [1, 2], [-1, -1], [3, 0], [2, -1], [1, 3]])  # -1: null route, top-p cut, drop
    expert = {"w": torch.zeros(3, 5)}  # 15 parameters per expert
    layer = SimpleNamespace(num_experts=4, last_topk_ids_TK=ids_TK, local_expert_weights=lambda: [expert] * 4)
    counts = DomainRouteCounts([layer], num_domains=3, device=torch.device("cpu"), domains=["code", "prose", "math"])
    for _ in range(2):  # two eval batches: the means stay
        counts.add(torch.tensor([[0, 0, 1, 1, -1, 2]]))
    row = counts.metrics()
    # code: tokens 0, 1 run 1 + 2 real experts; prose: tokens 2, 3 run 0 + 2; math: token 5 runs 2
    for domain, real_k in (("code", 3 / 2), ("prose", 2 / 2), ("math", 2 / 1)):
        assert row[f"moe/layer_0/real_experts_per_token/{domain}"] == pytest.approx(real_k)
        assert row[f"moe/layer_0/real_expert_flops_per_token/{domain}"] == pytest.approx(6 * 15 * real_k)


RUN = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--eval_steps", "0",
       "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--per_device_train_batch_size", "2",
       "--logging_steps", "1", "--gradient_accumulation_steps", "2", "--num_null_experts", "2", "--top_k", "3",
       "--top_p", "0.7", "--dynamic_loss_coef", "0.01", "--router_bias_update_rate", "0.01", "--drop_tokens", "false"]


def logged(output_dir, *keys):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [[r[key] for key in keys] for r in rows if "loss" in r]


KEYS = ("loss", "moe/layer_0/score_bias", "moe/layer_0/real_experts_per_token", "moe/layer_0/real_experts_histogram",
        "moe/layer_1/null_route_share", "moe/layer_1/real_expert_flops_per_token", "flops_per_token_spent")


@pytest.mark.parametrize("output", ["zero", "identity"])
def test_adaptive_run_logs_real_compute_and_resumes_exactly(world, tmp_path, output, capsys):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = [*RUN, "--null_expert_output", output]
    train.main([*run, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(full)])
    train.main([*run, "--max_steps", "4", "--output_dir", str(resumed),
                "--resume_from_checkpoint", str(full / "checkpoints" / "global_step2")])
    rows = logged(full, *KEYS)
    tokens = 2 * 2 * 32  # per step: batch x accumulation x block
    for _, bias, real_k, hist, null_share, flops, spent in rows:
        assert len(hist) == 4 and sum(hist) == tokens
        assert real_k == pytest.approx(sum(k * n for k, n in enumerate(hist)) / tokens) and real_k < 3
        assert 0 <= null_share < 1 and flops > 0 and spent > 0
        assert bias[4:] == [0.0, 0.0]  # no compute target: the null biases stay
    assert logged(resumed, *KEYS) == rows[2:]
    if output == "identity":  # what null experts output is the model's function: a resume keeps it
        with pytest.raises(SystemExit):
            train.main([*RUN, "--max_steps", "4", "--output_dir", str(tmp_path / "other"),
                        "--resume_from_checkpoint", str(full / "checkpoints" / "global_step2")])
        assert "was trained with --null_expert_output identity" in capsys.readouterr().err
    domains = json.loads((full / "run_config.json").read_text())["resolved"]["domains"]
    config = json.loads((full / "base_model" / "config.json").read_text())
    expert_flops = 6 * 3 * config["hidden_size"] * config["intermediate_size"]  # SwiGLU: 3 D x F matrices
    final_eval = [r for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r][-1]
    seen = [d for d in domains if sum(final_eval["moe/layer_0/domain_expert_counts"][domains.index(d)])]
    assert len(seen) >= 3
    eval_tokens = 0
    for domain in seen:  # each layer's real routes of the domain's tokens over their number: that number, in each
        row = domains.index(domain)
        real_k_L = [final_eval[f"moe/layer_{i}/real_experts_per_token/{domain}"] for i in range(4)]
        tokens_L = [sum(final_eval[f"moe/layer_{i}/domain_expert_counts"][row]) / real_k_L[i] for i in range(4)]
        assert tokens_L == pytest.approx([round(tokens_L[0])] * 4) and all(0 < k <= 3 for k in real_k_L)
        assert [final_eval[f"moe/layer_{i}/real_expert_flops_per_token/{domain}"] for i in range(4)] == pytest.approx(
            [expert_flops * k for k in real_k_L])
        eval_tokens += round(tokens_L[0])
    assert eval_tokens == 32 * json.loads((full / "run_config.json").read_text())["train"]["per_device_eval_batch_size"]


@pytest.mark.distributed
def test_adaptive_run_at_ep2_equals_ep1(tmp_path):
    """With identity null experts: the dispatch of zero ones, and their output, a term on the token's own rank; with
    ZeRO 2 and activation checkpointing (the recompute must route again as the forward did), over 2 micro-batches."""
    for ep in (1, 2):
        launch(["train.py", "--ep_size", str(ep), *RUN, "--null_expert_output", "identity", "--max_steps", "2",
                "--deepspeed", "zero2", "--gradient_checkpointing", "--output_dir", str(tmp_path / f"ep{ep}")])
    ep1, ep2 = logged(tmp_path / "ep1", *KEYS), logged(tmp_path / "ep2", *KEYS)
    assert len(ep1) == 2
    for row1, row2 in zip(ep1, ep2):
        assert row2[0] == pytest.approx(row1[0], rel=1e-5)
        assert row2[1:] == row1[1:]  # the routes (so biases, counts and FLOPs) are the same


def test_export_refuses_null_experts_and_top_p_with_the_reason():
    from helpers import tiny_model

    from moe_models.hf.configs import export_problems
    from moe_models.run.moe_layout import MoELayout
    dense = tiny_model().config
    for flags, reason in ((dict(num_null_experts=2), "zero-output experts"), (dict(top_p=0.5), "top-p"),
                          (dict(num_null_experts=2, null_expert_output="identity"), "such identity experts")):
        moe = MoEConfig(num_experts=4, drop_tokens=False, **flags)
        problems = export_problems(dense, moe, MoELayout.resolve(moe, dense.num_hidden_layers))
        assert any(reason in p for p in problems), problems
