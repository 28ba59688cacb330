"""The payoff report's judgement of its own horizon on hand-made numbers: tokens per parameter and the too-short mark,
best rates at an end of the sweep, and the gap over training; each against a formula written out here."""

import json
import math

import pytest

from moe_models.comparison.gap_over_training import common_evals, gap_points
from moe_models.comparison.horizon import Parameters, horizon, horizon_text, model_parameters
from moe_models.comparison.rate_brackets import bracket
from moe_models.comparison.runs import DENSE, DENSE_CONTINUED, MOE, UPCYCLED
from moe_models.comparison.summary_report import plot_gap, summary_lines
from moe_models.comparison.sweep import summarise
from moe_models.models.source import resolve_model_config
from moe_models.run.cli import parse_args

RUNS = (DENSE, MOE, UPCYCLED, DENSE_CONTINUED)


def test_parameter_counts_follow_the_llama_formula(tmp_path):
    """tiny-llama: vocabulary V 257 (embedding tied to the output), D 128, 4 blocks of attention (4 query heads and 2
    KV heads of 32) and an FFN (gate, up, down), two RMSNorms per block and a final one."""
    V, D, L, F = 257, 128, 4, 256
    attention = D * 4 * 32 + 2 * D * 2 * 32 + 4 * 32 * D
    common = V * D + L * (attention + 2 * D) + D

    dense_config = tmp_path / "dense.json"
    config = resolve_model_config(parse_args([]).model).to_dict()  # the preset, its FFN 2 F wide below
    dense_config.write_text(json.dumps({**config, "intermediate_size": 2 * F}))
    counts = model_parameters(parse_args(["--num_experts", "8", "--top_k", "2"]),
                              parse_args(["--model_config", str(dense_config), "--moe_layers", "none"]))
    ffn = 3 * D  # parameters per hidden unit: a row of gate and up, a column of down
    assert counts.dense == common + L * ffn * 2 * F
    # the MoE: 8 experts of F per block and a router of 8 x D; a token runs top-2 of them
    assert counts.moe_total == common + L * (8 * ffn * F + 8 * D)
    assert counts.moe_active == common + L * (2 * ffn * F + 8 * D)


def test_tokens_per_parameter_and_the_steps_that_reach_the_threshold():
    counts = Parameters(dense=262_784, moe_active=264_832, moe_total=854_656)  # d 64, E 8 of F 128, top-2
    short = horizon(counts, max_steps=300, tokens_per_step=8 * 128)
    tokens = 300 * 8 * 128
    assert short["tokens"] == tokens
    assert short["tokens_per_parameter"] == pytest.approx(
        {"dense": tokens / 262_784, "moe_active": tokens / 264_832, "moe_total": tokens / 854_656})
    assert short["too_short"]  # 1.17 tokens per dense parameter, below 10
    assert short["steps_to_threshold"] == 2567  # 10 x 262,784 / 1,024 = 2566.25 steps, rounded up
    assert "1.17 tokens per parameter of the dense model (262,784 parameters)" in horizon_text(short)
    assert "too short to judge (--max_steps 2567 would reach it" in horizon_text(short)
    assert not horizon(counts, max_steps=2567, tokens_per_step=1024)["too_short"]
    assert horizon(counts, max_steps=2566, tokens_per_step=1024)["too_short"]


def test_the_next_rate_continues_the_sweeps_own_step_past_its_end():
    lrs = [1e-3, 2e-3, 4e-3]
    assert bracket(lrs, 2e-3) == {"best": 2e-3, "edge": None, "next_to_try": []}
    assert bracket(lrs, 4e-3)["edge"] == "largest"
    assert bracket(lrs, 4e-3)["next_to_try"] == pytest.approx([4e-3 * (4e-3 / 2e-3)])
    assert bracket([1e-3, 3e-3], 1e-3)["edge"] == "smallest"
    assert bracket([1e-3, 3e-3], 1e-3)["next_to_try"] == pytest.approx([1e-3 / (3e-3 / 1e-3)])
    assert bracket([2e-3], 2e-3) == {"best": 2e-3, "edge": "only", "next_to_try": [1e-3, 4e-3]}


def cell(lr: float, seed: int, finals: dict[str, float]) -> dict:
    """A payoff.json cell with eval curves that are straight lines: (a) and (b) from 4.0 at step 0 to their final
    losses at step 10; (c) and (d) leave (a) at step 5 (its value there, (4.0 + (a)'s final) / 2) on a line to their
    own final. Evals at 0, 5, 10; 100 FLOPs per step; 64 tokens per step."""
    def run(name: str) -> dict:
        branch = name in (UPCYCLED, DENSE_CONTINUED)
        line = {0: 4.0, 5: (4.0 + finals[DENSE if branch else name]) / 2, 10: finals[name]}
        return {"final_eval_loss": finals[name], "specialisation": None,
                "eval": [{"step": s, "eval_loss": line[s], "training_flops": 100.0 * s}
                         for s in ((5, 10) if branch else (0, 5, 10))]}
    return {"learning_rate": lr, "seed": seed, "max_steps": 10, "switch_step": 5, "tokens_per_step": 64,
            "runs": {name: run(name) for name in RUNS}}


# final eval losses (a), (b), (c), (d) per (learning rate, seed): (a), (c) and (d) are best at 2e-3, bracketed by
# 1e-3 and 4e-3; (b) at 1e-3, the smallest rate of the sweep
FINALS = {1e-3: [(3.0, 2.70, 3.0, 3.0), (3.1, 2.80, 3.1, 3.1), (3.2, 2.75, 3.2, 3.2)],
          2e-3: [(2.9, 3.00, 2.80, 2.86), (2.95, 3.00, 2.90, 2.93), (2.92, 3.00, 2.83, 2.91)],
          4e-3: [(3.3, 3.50, 3.3, 3.3), (3.3, 3.50, 3.3, 3.3), (3.3, 3.50, 3.3, 3.3)]}
SEEDS = (1, 2, 3)


@pytest.fixture
def cells():
    return [cell(lr, seed, dict(zip(RUNS, values))) for lr, by_seed in FINALS.items()
            for seed, values in zip(SEEDS, by_seed)]


def test_the_gap_over_training_is_paired_at_equal_steps_seed_by_seed(cells, tmp_path):
    summary = summarise(cells)
    assert summary["best_learning_rate"] == {DENSE: 2e-3, MOE: 1e-3, UPCYCLED: 2e-3, DENSE_CONTINUED: 2e-3}
    gaps = {g["key"]: g for g in summary["gap_over_training"]}
    # (b) at 1e-3 - (a) at 2e-3 on straight lines from 4.0: at step s, s / 10 x (b's final - a's final)
    b = [v[1] for v in FINALS[1e-3]]
    a = [v[0] for v in FINALS[2e-3]]
    points = gaps["moe_minus_dense"]["points"]
    assert [(p["step"], p["tokens"]) for p in points] == [(0, 0), (5, 5 * 64), (10, 10 * 64)]
    for p in points:
        by_seed = [p["step"] / 10 * (b_i - a_i) for b_i, a_i in zip(b, a)]
        mean = sum(by_seed) / 3
        assert p["by_seed"] == pytest.approx(by_seed)
        assert p["mean"] == pytest.approx(mean)
        assert (p["min"], p["max"]) == pytest.approx((min(by_seed), max(by_seed)))
        if p["step"]:
            assert p["std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in by_seed) / 2))
    # (c) - (d), both at 2e-3, from the switch: 0 at step 5 (both are (a) there), their finals' difference at 10
    c_minus_d = [v[2] - v[3] for v in FINALS[2e-3]]
    points = gaps["upcycled_minus_continued"]["points"]
    assert [p["step"] for p in points] == [5, 10]
    assert points[0]["by_seed"] == pytest.approx([0, 0, 0])
    assert points[1]["by_seed"] == pytest.approx(c_minus_d)
    assert points[1]["mean"] == pytest.approx(sum(c_minus_d) / 3)
    text = "\n".join(summary_lines(summary))
    assert "## Gap over training: best b_moe - best a_dense, eval loss at equal steps" in text
    assert f"| 10 | 640 | {', '.join(f'{x:+.4f}' for x in c_minus_d)} | {sum(c_minus_d) / 3:+.4f} |" in text
    plot_gap(summary, tmp_path / "gap.png")
    assert (tmp_path / "gap.png").stat().st_size > 0


def test_an_unevaluated_step_is_read_off_the_line_between_evals():
    first = [{"step": 10, "eval_loss": 2.0}, {"step": 20, "eval_loss": 1.5}]
    second = [{"step": 0, "eval_loss": 3.0}, {"step": 15, "eval_loss": 2.4}, {"step": 30, "eval_loss": 1.8}]
    # at 10: 3.0 + 10 / 15 x (2.4 - 3.0); at 20: 2.4 + 5 / 15 x (1.8 - 2.4)
    gaps = gap_points(first, second)
    assert gaps == pytest.approx({10: 2.0 - (3.0 + 10 / 15 * -0.6), 20: 1.5 - (2.4 + 5 / 15 * -0.6)})
    assert common_evals([gaps, {20: 0.1}]) == [(20, [gaps[20], 0.1])]


def test_verdicts_are_marked_too_short_and_unbracketed(cells):
    counts = Parameters(dense=1000, moe_active=1010, moe_total=3000)
    short = summarise(cells, horizon(counts, max_steps=10, tokens_per_step=64))  # 0.64 tokens per dense parameter
    compared = {c["key"]: c for c in short["comparisons"]}
    for c in short["comparisons"]:
        if c["verdict"]:
            assert c["caveats"][0] == "too short to judge (0.64 tokens per dense parameter, below 10)"
    moe_mark = "rests on an unbracketed best: b_moe's best rate 0.001 is the smallest of the sweep (try 0.0005 next)"
    assert moe_mark in compared["moe_minus_dense"]["caveats"]
    assert not any("unbracketed" in mark for mark in compared["upcycled_minus_continued"]["caveats"])
    assert any("biased against the MoE by the schedule" in mark for mark in compared["reached"]["caveats"])
    assert short["rate_brackets"][MOE]["next_to_try"] == pytest.approx([5e-4])
    text = "\n".join(summary_lines(short))
    assert "**Too short to judge.**" in text and "(--max_steps 157 would reach it" in text  # 10 x 1000 / 64 = 156.25
    assert "Not bracketed, so a better rate may lie beyond the sweep: b_moe's best rate 0.001" in text
    assert f"| {compared['moe_minus_dense']['verdict']}; too short to judge" in text

    long = summarise(cells, horizon(counts, max_steps=10, tokens_per_step=1000))  # 10 tokens per dense parameter
    compared = {c["key"]: c for c in long["comparisons"]}
    assert compared["upcycled_minus_continued"]["caveats"] == []
    assert compared["moe_minus_dense"]["caveats"] == [moe_mark]
    assert "Too short" not in "\n".join(summary_lines(long))


def test_one_rate_is_no_sweep_and_says_which_rates_to_try(cells):
    one = [c for c in cells if c["learning_rate"] == 2e-3]
    summary = summarise(one)
    assert {name: b["edge"] for name, b in summary["rate_brackets"].items()} == dict.fromkeys(RUNS, "only")
    compared = {c["key"]: c for c in summary["comparisons"]}
    assert compared["moe_minus_dense"]["caveats"] == ["rests on one learning rate, not swept (--sweep_lrs)"]
    assert summary["horizon"] is None  # not known: no mark
    assert ("One learning rate: not swept, so no model's best rate is bracketed (try 0.001 and 0.004); give "
            "--sweep_lrs.") in "\n".join(summary_lines(summary))
