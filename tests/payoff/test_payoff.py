"""The payoff command end to end on one process (three tiny runs), its numbers against formulas written out here,
the upcycled start against the dense run, and a rerun after an interruption."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moe_models.run.cli import parse_args
from moe_models.run.config import ConfigError
from moe_models.metrics.run_report import write_report as write_run_report
from moe_models.comparison.runs import (DENSE, DENSE_CONTINUED, MOE, UPCYCLED, PayoffPlan, PayoffRun,
                                        check_same_command, plan_grid, switch_step)
from moe_models.data.synthetic import entropy_floor
from moe_models.comparison.payoff_report import write_report
from moe_models.comparison.analysis import realised_schedule, training_flops
from moe_models.comparison.results import collect
from moe_models.comparison.summary_report import summary_lines
from moe_models.comparison.sweep import MET, NOT_MET, UNDECIDED, summarise, verdict
from helpers import REPO, child_env

TINY = ["--max_steps", "8", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "2",
        "--block_size", "32", "--synthetic_examples", "400", "--per_device_train_batch_size", "4",
        "--max_eval_batches", "2", "--num_experts", "4", "--disable_tqdm", "--inference_batch", "0"]


def run_payoff(output_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_models.payoff", "--output_dir", str(output_dir), *TINY, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in rows(run_dir) if "eval_loss" in r}


@pytest.fixture(scope="module")
def payoff(tmp_path_factory):
    out = tmp_path_factory.mktemp("payoff") / "out"
    result = run_payoff(out, "--inference_batch", "2", "--inference_new_tokens", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def test_the_payoff_trains_four_ordinary_run_folders_and_reports(payoff):
    for name in (DENSE, MOE, UPCYCLED, DENSE_CONTINUED):
        run = payoff / name
        assert (run / "checkpoints" / "latest").read_text() == "global_step8"
        assert max(r["step"] for r in rows(run)) == 8
    dense_config = json.loads((payoff / DENSE / "run_config.json").read_text())
    assert dense_config["resolved"]["moe_layout"]["blocks"] == []
    assert json.loads((payoff / DENSE / "base_model" / "config.json").read_text())["intermediate_size"] == 2 * 256
    assert json.loads((payoff / MOE / "run_config.json").read_text())["moe"]["expert_init"] == "random"
    upcycled = json.loads((payoff / UPCYCLED / "run_config.json").read_text())["moe"]
    assert (upcycled["expert_init"], upcycled["granularity"]) == ("granular", 2)

    results = json.loads((payoff / "payoff.json").read_text())
    assert (results["switch_step"], results["max_steps"], results["eval_steps"]) == (4, 8, 2)
    assert results["tokens_per_step"] == 4 * 32
    for name in (DENSE, MOE, UPCYCLED):
        run = results["runs"][name]
        assert run["final_eval_loss"] == eval_losses(payoff / name)[8]
        assert run["joules_per_token"] is None  # no NVML on CPU
        assert run["tokens_per_sec"] > 0 and run["step_time"] > 0
    # Equal active FLOPs: k experts of F against one FFN of k x F; the MoE adds only its routers (E x D per layer).
    router_flops = 6 * 4 * (4 * 128)  # 6 x layers x E x D
    assert results["runs"][MOE]["flops_per_token"] - results["runs"][DENSE]["flops_per_token"] == router_flops
    assert set(results["reached_dense_final_loss"][MOE]) >= {"step", "fraction_of_dense_steps", "how"}
    assert "added_flops" in results["upcycled_vs_dense_continuation"]
    # The built-in corpus's entropy floor beside each run's final loss per domain.
    floor = entropy_floor(400, 42)
    assert results["entropy_floor"] == {"nats_per_token": floor.nats_per_token, "by_domain": floor.by_domain}
    for name in (DENSE, MOE, UPCYCLED):
        final_eval, = [r for r in rows(payoff / name) if r.get("step") == 8 and "eval_loss" in r]
        by_domain = results["runs"][name]["final_eval_loss_by_domain"]
        assert by_domain and by_domain == {key[len("eval_loss/"):]: value for key, value in final_eval.items()
                                           if key.startswith("eval_loss/")}
    text = (payoff / "payoff.md").read_text()
    assert f"{floor.nats_per_token:.4f} nats/token overall" in text
    assert "Upcycled against dense continuation" in text and "not measured" in text
    for image in ("eval_loss_vs_steps.png", "eval_loss_vs_flops.png", "speed.png", "lr_sweep.png",
                  "quality_vs_decode_latency.png", "gap_over_training.png"):
        assert (payoff / image).stat().st_size > 0
    # The exported models, served by stock transformers (tests/payoff/test_inference.py checks the figures).
    inference = results["summary"]["inference"]
    assert set(inference["models"]) == {DENSE, MOE, UPCYCLED}
    assert all((payoff / "inference" / name / "config.json").is_file() for name in inference["models"])
    assert inference["ratios"][MOE]["final_eval_loss"] == pytest.approx(
        results["runs"][MOE]["final_eval_loss"] / results["runs"][DENSE]["final_eval_loss"])
    assert "## Inference: the exported models served by stock transformers" in text
    write_run_report(payoff / DENSE)  # moe-report reads a dense run too

    # The horizon's parameter counts (meta-device models of the settings) are those of the models the runs trained:
    # train.py records the dense model's and the MoE's parameters, and FLOPs/token = 6 x active + 12 L d S.
    horizon = results["summary"]["horizon"]
    dense_record = json.loads((payoff / DENSE / "run_config.json").read_text())["resolved"]
    moe_record = json.loads((payoff / MOE / "run_config.json").read_text())["resolved"]
    assert horizon["parameters"] == {"dense": dense_record["dense_parameters"],
                                     "moe_total": moe_record["moe_parameters_per_rank"],
                                     "moe_active": (moe_record["flops_per_token"] - 12 * 4 * 128 * 32) / 6}
    assert horizon["tokens"] == 8 * 4 * 32 and horizon["too_short"]
    assert "**Too short to judge.**" in text and "too short to judge (" in text
    gap = {g["key"]: g for g in results["summary"]["gap_over_training"]}
    moe_eval, dense_eval = eval_losses(payoff / MOE), eval_losses(payoff / DENSE)
    assert [(p["step"], p["tokens"]) for p in gap["moe_minus_dense"]["points"]] == [(s, s * 128) for s in (2, 4, 6, 8)]
    assert [p["mean"] for p in gap["moe_minus_dense"]["points"]] == pytest.approx(
        [moe_eval[s] - dense_eval[s] for s in (2, 4, 6, 8)])


def test_the_upcycled_run_starts_as_the_dense_run_at_the_switch_step_and_keeps_its_schedule(payoff):
    dense, upcycled = eval_losses(payoff / DENSE), eval_losses(payoff / UPCYCLED)
    assert min(upcycled) == 4  # evaluated before its first update
    assert upcycled[4] == pytest.approx(dense[4], rel=1e-5)  # granular experts compute the dense FFN
    dense_rows = {r["step"]: r for r in rows(payoff / DENSE) if "loss" in r}
    upcycled_rows = [r for r in rows(payoff / UPCYCLED) if "loss" in r]
    assert [r["step"] for r in upcycled_rows] == [5, 6, 7, 8]
    for row in upcycled_rows:  # the same LR schedule and token count, continued at step 4 (step 5 included)
        assert row["lr"] == pytest.approx(dense_rows[row["step"]]["lr"], rel=1e-12)
        assert row["tokens_seen"] == dense_rows[row["step"]]["tokens_seen"]


def adam_steps(run_dir, step: int) -> set[float]:
    """The step counts of torch AdamW's state of every parameter in a ZeRO checkpoint: the updates since the
    optimizer state was made."""
    saved = torch.load(run_dir / "checkpoints" / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       map_location="cpu", weights_only=False)
    return {float(s["step"]) for s in saved["optimizer_state_dict"]["base_optimizer_state"]["state"].values()}


def test_the_fair_dense_continuation_gets_the_upcycled_runs_treatment_and_batches(payoff):
    """(c) and (d) leave (a) at step 4 with a fresh optimizer state each (AdamW's step count: 4 updates by step 8,
    (a)'s 8), the same LR at every step after it, the same batches: their first training losses equal (a)'s, as the
    upcycled model starts as exactly the dense one, and they end at the same data position."""
    assert adam_steps(payoff / DENSE, 8) == {8.0}
    assert adam_steps(payoff / UPCYCLED, 8) == adam_steps(payoff / DENSE_CONTINUED, 8) == {4.0}
    train = {name: {r["step"]: r for r in rows(payoff / name) if "loss" in r}
             for name in (DENSE, UPCYCLED, DENSE_CONTINUED)}
    assert sorted(train[DENSE_CONTINUED]) == sorted(train[UPCYCLED]) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert train[DENSE_CONTINUED][step]["lr"] == train[UPCYCLED][step]["lr"] == train[DENSE][step]["lr"] > 0
    assert train[UPCYCLED][5]["loss"] == pytest.approx(train[DENSE_CONTINUED][5]["loss"], rel=1e-5)
    assert train[DENSE_CONTINUED][5]["loss"] == pytest.approx(train[DENSE][5]["loss"], rel=1e-6)
    positions = {name: (payoff / name / "checkpoints" / "global_step8" / "data_rank0.json").read_text()
                 for name in (DENSE, UPCYCLED, DENSE_CONTINUED)}
    assert len(set(positions.values())) == 1
    results = json.loads((payoff / "payoff.json").read_text())
    fair, no_reset = results["upcycled_vs_dense_continuation"], results["upcycled_vs_dense_without_reset"]
    assert (fair["continuation"], no_reset["continuation"]) == (DENSE_CONTINUED, DENSE)
    assert fair["dense_eval_loss"] == pytest.approx(eval_losses(payoff / DENSE_CONTINUED)[8])


def test_a_rerun_keeps_finished_runs_and_resumes_the_interrupted_one_exactly(payoff, tmp_path):
    copy = tmp_path / "payoff"
    shutil.copytree(payoff, copy)
    # As if the command was killed after the upcycled run saved step 6: its step-8 checkpoint and rows are gone
    # (and (d)'s: it continues its own checkpoint, not (a)'s at the switch).
    for name in (UPCYCLED, DENSE_CONTINUED):
        shutil.rmtree(copy / name / "checkpoints" / "global_step8")
        (copy / name / "checkpoints" / "latest").write_text("global_step6")
        kept = [line for line in (copy / name / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["step"] <= 6]
        (copy / name / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    (copy / "payoff.json").unlink()
    finished = {name: os.stat(copy / name / "metrics.jsonl").st_mtime_ns for name in (DENSE, MOE)}

    result = run_payoff(copy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"{DENSE} ((a)" in result.stdout and "finished earlier; kept" in result.stdout
    assert "Resumed from" in result.stdout
    # The plan before training says the horizon: 8 steps of 128 tokens, far below 10 tokens per dense parameter.
    dense_parameters = json.loads((payoff / "payoff.json").read_text())["summary"]["horizon"]["parameters"]["dense"]
    assert (f"payoff: horizon: 1,024 tokens per run (8 steps of 128): {1024 / dense_parameters:.2f} tokens per "
            f"parameter of the dense model ({dense_parameters:,} parameters)") in result.stdout
    assert f"too short to judge (--max_steps {math.ceil(10 * dense_parameters / 128)} would reach it" in result.stdout
    assert {name: os.stat(copy / name / "metrics.jsonl").st_mtime_ns for name in (DENSE, MOE)} == finished
    assert f"Resumed from {copy / DENSE_CONTINUED / 'checkpoints' / 'global_step6'} at step 6" in result.stdout
    for name in (UPCYCLED, DENSE_CONTINUED):
        assert eval_losses(copy / name) == pytest.approx(eval_losses(payoff / name), rel=1e-6)
    assert (copy / "payoff.json").is_file()


def test_a_rerun_with_other_settings_is_refused(payoff, tmp_path):
    copy = tmp_path / "payoff"
    shutil.copytree(payoff / "dense_model", copy / "dense_model")
    shutil.copy(payoff / "payoff_plan.json", copy / "payoff_plan.json")
    result = run_payoff(copy, "--learning_rate", "0.01")
    assert result.returncode == 1
    assert "holds a payoff with other settings (--learning_rate 0.001 there, 0.01 here)" in result.stderr


def test_a_setting_newer_than_the_folder_counts_at_its_default(tmp_path):
    """A folder started before a flag existed recorded no value for it: its runs had the default, so the same
    command continues it, and only another value is refused."""
    cfg = parse_args(["--output_dir", str(tmp_path)])
    check_same_command(cfg, 0.5)
    plan_file = tmp_path / "payoff_plan.json"
    recorded = json.loads(plan_file.read_text())
    del recorded["prove_conversion"]
    plan_file.write_text(json.dumps(recorded))
    check_same_command(cfg, 0.5)
    with pytest.raises(ConfigError, match="--prove_conversion True there, False here"):
        check_same_command(parse_args(["--output_dir", str(tmp_path), "--prove_conversion", "false"]), 0.5)


# The report's numbers on hand-made runs.

def write_run(folder, evals: dict[int, float], flops_per_token: float, extra_eval: dict | None = None,
              extra_train: dict | None = None) -> None:
    folder.mkdir(parents=True)
    config = {"train": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}, "data": {"block_size": 5},
              "resolved": {"world_size": 1, "flops_per_token": flops_per_token, "domains": ["code", "prose"]}}
    (folder / "run_config.json").write_text(json.dumps(config))
    lines = [{"step": s, "loss": loss + 0.1, "tokens_per_sec": 100.0, "step_time": 0.1, "tokens_seen": 10 * s,
              **(extra_train or {})} for s, loss in evals.items()]
    lines += [{"step": s, "eval_loss": loss, **(extra_eval if extra_eval and s == max(evals) else {})}
              for s, loss in evals.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def hand_made(tmp_path):
    write_run(tmp_path / DENSE, {10: 4.0, 20: 3.0, 30: 2.5, 40: 2.2}, flops_per_token=100)
    counts = {"moe/layer_0/domain_expert_counts": [[10, 0], [0, 10]], "moe/layer_0/domain_mutual_information": 1.0,
              "moe/layer_0/domain_mutual_information_normalised": 1.0, "eval_loss/code": 1.5, "eval_loss/prose": 2.1}
    write_run(tmp_path / MOE, {10: 3.5, 20: 2.6, 30: 2.0, 40: 1.8}, flops_per_token=110, extra_eval=counts)
    write_run(tmp_path / UPCYCLED, {20: 3.0, 30: 2.4, 40: 2.1}, flops_per_token=110)
    write_run(tmp_path / DENSE_CONTINUED, {30: 2.45, 40: 2.15}, flops_per_token=100)
    runs = [PayoffRun(name, name, []) for name in (DENSE, MOE, UPCYCLED, DENSE_CONTINUED)]
    return tmp_path, PayoffPlan(tmp_path, max_steps=40, switch_step=20, top_k=2, runs=runs)


def test_the_reached_fraction_and_equal_flops_comparison_follow_their_formulas(hand_made):
    folder, plan = hand_made
    results = collect(plan, ["--max_steps", "40"])
    tokens_per_step = 2 * 5
    reached = results["reached_dense_final_loss"]
    assert reached["target_eval_loss"] == 2.2
    # (b) crosses 2.2 between step 20 (2.6) and 30 (2.0): 20 + (2.6 - 2.2) / (2.6 - 2.0) x 10.
    step_b = 20 + (2.6 - 2.2) / (2.6 - 2.0) * 10
    assert reached[MOE]["step"] == pytest.approx(step_b)
    assert reached[MOE]["fraction_of_dense_steps"] == pytest.approx(step_b / 40)
    assert reached[MOE]["fraction_of_dense_flops"] == pytest.approx(step_b * 110 / (40 * 100))
    # (c) is the dense run (100 FLOPs/token) to step 20, then the MoE (110): it crosses between 30 (2.4) and 40 (2.1).
    step_c = 30 + (2.4 - 2.2) / (2.4 - 2.1) * 10
    assert reached[UPCYCLED]["step"] == pytest.approx(step_c)
    assert reached[UPCYCLED]["fraction_of_dense_flops"] == pytest.approx((20 * 100 + (step_c - 20) * 110) / 4000)
    assert results["runs"][UPCYCLED]["training_flops"] == tokens_per_step * (20 * 100 + 20 * 110)

    compared = results["upcycled_vs_dense_continuation"]
    assert compared["start_eval_loss"] == {UPCYCLED: 3.0, DENSE: 3.0}
    # Added FLOPs since step 20: the dense run adds 20 x 100 x 10 by step 40; the upcycled run has added as much
    # at step 20 + 2000 / 110, between its evals at 30 (2.4) and 40 (2.1).
    assert compared["added_flops"] == pytest.approx(20 * 100 * tokens_per_step)
    step = 20 + 2000 / 110
    assert compared["upcycled_eval_loss"] == pytest.approx(2.4 + (step - 30) / 10 * (2.1 - 2.4))
    assert compared["dense_eval_loss"] == pytest.approx(2.15)  # (d), the control, at step 40
    without_reset = results["upcycled_vs_dense_without_reset"]
    assert without_reset["dense_eval_loss"] == pytest.approx(2.2)  # (a) itself at step 40

    special = results["runs"][MOE]["specialisation"]
    assert special["domains"] == ["code", "prose"]
    assert special["layers"]["0"]["domain_expert_counts"] == [[10, 0], [0, 10]]
    assert special["layers"]["0"]["mutual_information_by_step"] == [[40, 1.0]]
    assert results["runs"][DENSE]["specialisation"] is None

    report = write_report(results, folder).read_text()
    assert "| b_moe | 0 | 1.0000 | 1.000 |" in report
    assert (folder / "domains_b_moe_layer_0.png").is_file()
    assert "| b_moe | 26.7 | 67% | 73% |" in report
    assert results["runs"][MOE]["final_eval_loss_by_domain"] == {"code": 1.5, "prose": 2.1}
    assert results["entropy_floor"] is None  # hand-made runs name no corpus
    assert "| code | not measured | 1.5000 | not measured |" in report


def test_training_flops_follow_each_intervals_realised_flops():
    # logged at steps 10 and 20 with 50 and 70 FLOPs/token spent; the last interval's figure covers later steps
    schedule = realised_schedule([{"step": 10, "flops_per_token_spent": 50.0}, {"step": 20}], planned=100.0)
    assert schedule == [(10, 50.0), (20, 100.0)]  # a row without the figure: the planned one
    schedule = realised_schedule([{"step": 20, "flops_per_token_spent": 70.0},
                                  {"step": 10, "flops_per_token_spent": 50.0}], planned=100.0)
    assert training_flops(15, schedule, tokens_per_step=4) == 4 * (10 * 50 + 5 * 70)
    assert training_flops(25, schedule, tokens_per_step=4) == 4 * (10 * 50 + 15 * 70)
    assert training_flops(8, [(5, 100.0), *schedule], tokens_per_step=4) == 4 * (5 * 100 + 3 * 50)
    assert training_flops(30, realised_schedule([], planned=100.0), tokens_per_step=4) == 4 * 30 * 100


def layer_compute(real_k: list[float], expert_flops: float, spent: float) -> dict:
    """A training row's adaptive-compute values: per MoE layer its real experts per token and their FLOPs."""
    row = {"flops_per_token_spent": spent}
    for i, k in enumerate(real_k):
        row.update({f"moe/layer_{i}/real_experts_per_token": k,
                    f"moe/layer_{i}/real_expert_flops_per_token": k * expert_flops})
    return row


def test_a_variant_is_compared_with_the_moe_at_equal_realised_flops(hand_made):
    folder, plan = hand_made
    shutil.rmtree(folder / MOE)
    write_run(folder / MOE, {10: 3.5, 20: 2.6, 30: 2.0, 40: 1.8}, flops_per_token=110,
              extra_train=layer_compute([2.0, 2.0], expert_flops=20, spent=110))
    # (e1): planned 110 FLOPs/token like (b), but its tokens ran 1.5 and 1.0 real experts: 80 FLOPs/token spent
    write_run(folder / "e1_variant", {10: 3.4, 20: 2.5, 30: 1.9, 40: 1.7}, flops_per_token=110,
              extra_train=layer_compute([1.5, 1.0], expert_flops=20, spent=80))
    plan = PayoffPlan(folder, 40, 20, 2, [*plan.runs, PayoffRun("e1_variant", "(e1) MoE with --top_p 0.5", [])])
    results = collect(plan, [])
    tokens_per_step = 2 * 5
    variant = results["runs"]["e1_variant"]
    assert variant["flops_per_token"] == 110 and variant["flops_per_token_spent"] == pytest.approx(80)
    assert variant["real_experts_per_token"] == pytest.approx((1.5 + 1.0) / 2)
    assert variant["real_expert_flops_per_token"] == pytest.approx(1.5 * 20 + 1.0 * 20)
    assert variant["training_flops"] == 40 * 80 * tokens_per_step
    assert [e["training_flops"] for e in variant["eval"]] == [s * 80 * tokens_per_step for s in (10, 20, 30, 40)]
    assert results["runs"][DENSE]["real_experts_per_token"] is None
    compared = results["variants_vs_moe"]["e1_variant"]
    assert compared["training_flops_share"] == pytest.approx(80 / 110)
    # at the variant's final FLOPs, 32000: (b) is at step 32000 / (110 x 10) = 29.09, between 20 (2.6) and 30 (2.0)
    x = 40 * 80 * tokens_per_step
    assert compared["equal_flops"] == x and compared["variant_eval_loss"] == 1.7
    moe_loss = 2.6 + (x / (110 * tokens_per_step) - 20) / 10 * (2.0 - 2.6)
    assert compared["moe_eval_loss"] == pytest.approx(moe_loss)
    assert compared["variant_minus_moe"] == pytest.approx(1.7 - moe_loss)
    # it reaches (b)'s final 1.8 at step 35 (between 1.9 at 30 and 1.7 at 40): 35 x 80 of (b)'s 40 x 110
    assert compared["reached_moe_final_loss"]["fraction_of_moe_flops"] == pytest.approx(35 * 80 / (40 * 110))
    report = write_report(results, folder).read_text()
    assert "| e1_variant: (e1) MoE with --top_p 0.5 | 110 | 80 | 1.2500 | 50 | 1.7000 | 3.2e+04 |" in report
    assert f"| e1_variant: (e1) MoE with --top_p 0.5 | 62% | 73% | 3.2e+04 | 1.7000 | {moe_loss:.4f} |" in report
    summary = {c["key"]: c for c in summarise([results])["comparisons"]}
    assert summary["e1_variant_minus_moe"]["by_seed"] == pytest.approx([1.7 - moe_loss])


def test_variants_become_runs_and_bad_ones_are_refused(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--num_experts", "8"]
    grid = plan_grid(parse_args(flags), flags, 0.5, None, 1, 1,
                     ["top_p=0.5,top_k=4", "num_null_experts=4,router_bias_update_rate=1e-3"])
    variants = [run for run in grid.cells[0].runs if run.name.endswith("_variant")]
    assert [run.name for run in variants] == ["e1_variant", "e2_variant"]
    assert variants[0].flags[-4:] == ["--top_p", "0.5", "--top_k", "4"]
    assert "--expert_init" in variants[1].flags and variants[1].flags[-2:] == ["--router_bias_update_rate", "1e-3"]
    for spec, message in (("top_p", "name=value"), ("top_pp=0.5", "top_pp is no train.py setting"),
                          ("expert_init=copy", "expert_init is set by the payoff"), ("top_p=2", "top_p (2.0)")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            plan_grid(parse_args(flags), flags, 0.5, None, 1, 1, [spec])


def test_without_domain_counts_the_report_says_so(hand_made):
    folder, plan = hand_made
    (folder / MOE / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (folder / MOE / "metrics.jsonl").read_text().splitlines()
                if "domain" not in line))
    report = write_report(collect(plan, []), folder).read_text()
    assert "No domain x expert counts" in report


# The sweep over learning rates and seeds, and the verdict rule, on hand-made cells.

def cell(lr: float, seed: int, finals: dict[str, float], information: float) -> dict:
    """A payoff.json cell: (a)'s and (b)'s eval curves straight lines from 4.0 at step 0 to their final losses at
    step 10, (c) and (d) leaving (a) at step 5; 100 FLOPs per step for every run."""
    def run(name: str, final: float) -> dict:
        branch = name in (UPCYCLED, DENSE_CONTINUED)  # (a)'s curve to step 5, then a line to its own final loss
        steps = (5, 10) if branch else (0, 5, 10)
        line = {0: 4.0, 5: (4.0 + finals[DENSE if branch else name]) / 2, 10: final}
        layers = {"0": {"mutual_information_bits": information}} if name in (MOE, UPCYCLED) else {}
        return {"final_eval_loss": final, "specialisation": {"layers": layers} if layers else None,
                "eval": [{"step": s, "eval_loss": line[s], "training_flops": 100.0 * s} for s in steps]}
    return {"learning_rate": lr, "seed": seed, "max_steps": 10, "switch_step": 5, "tokens_per_step": 64,
            "runs": {name: run(name, final) for name, final in finals.items()}}


def test_the_sweep_takes_each_models_best_rate_and_the_seeds_mean_and_spread():
    finals = {(1e-3, 1): (3.0, 2.8, 2.9, 2.95), (1e-3, 2): (3.1, 2.9, 3.0, 3.02),
              (2e-3, 1): (2.9, 3.2, 2.85, 2.8), (2e-3, 2): (2.95, 3.3, 2.9, 2.88)}
    cells = [cell(lr, seed, dict(zip((DENSE, MOE, UPCYCLED, DENSE_CONTINUED), values)), 0.4 + seed / 10)
             for (lr, seed), values in finals.items()]
    summary = summarise(cells)
    assert summary["learning_rates"] == [1e-3, 2e-3] and summary["seeds"] == [1, 2]
    # (a) at 2e-3 over the seeds: mean (2.9 + 2.95) / 2, std sqrt(((2.9 - m)^2 + (2.95 - m)^2) / (2 - 1)).
    dense = summary["final_eval_loss"][DENSE][repr(2e-3)]
    m = (2.9 + 2.95) / 2
    assert dense == pytest.approx({"mean": m, "min": 2.9, "max": 2.95, "n": 2,
                                   "std": math.sqrt((2.9 - m) ** 2 + (2.95 - m) ** 2)})
    assert summary["best_learning_rate"] == {DENSE: 2e-3, MOE: 1e-3, UPCYCLED: 2e-3, DENSE_CONTINUED: 2e-3}
    compared = {c["key"]: c for c in summary["comparisons"]}
    # Best (b) (1e-3) against best (a) (2e-3), seed by seed: the line 4.0 -> final over 10 steps reaches (a)'s final
    # at 10 x (4.0 - target) / (4.0 - final), between the evals at 5 and 10 (linear, so the interpolation is exact).
    shares = [(4.0 - 2.9) / (4.0 - 2.8), (4.0 - 2.95) / (4.0 - 2.9)]
    assert compared["reached"]["by_seed"] == pytest.approx(shares)
    assert compared["reached"]["verdict"] == NOT_MET
    assert compared["moe_minus_dense"]["by_seed"] == pytest.approx([2.8 - 2.9, 2.9 - 2.95])
    assert compared["moe_minus_dense"]["verdict"] == MET
    # (c) and (d) at 2e-3 both end at step 10 with 500 FLOPs added since the switch: their final losses.
    assert compared["upcycled_minus_continued"]["by_seed"] == pytest.approx([2.85 - 2.8, 2.9 - 2.88])
    assert compared["upcycled_minus_continued"]["verdict"] == NOT_MET
    assert compared["upcycled_minus_without_reset"]["by_seed"] == pytest.approx([2.85 - 2.9, 2.9 - 2.95])
    assert compared["moe_information"]["by_seed"] == pytest.approx([0.5, 0.6])
    assert compared["moe_information"]["verdict"] == UNDECIDED  # 0.5 is not above 0.5
    lines = "\n".join(summary_lines(summary))
    assert f"| {DENSE} | 3.0500 (3.0000..3.1000) | 2.9250 (2.9000..2.9500) | 0.002 |" in lines


def test_a_goal_is_met_only_when_the_spread_does_not_cover_its_threshold():
    below_zero = lambda v: v < 0  # noqa: E731
    assert verdict([-0.02, -0.01], below_zero) == MET
    assert verdict([-0.02, 0.01], below_zero) == UNDECIDED
    assert verdict([0.02, 0.01], below_zero) == NOT_MET
    assert verdict([-0.02, None], below_zero) == UNDECIDED  # a seed that never reached it does not meet it
    assert verdict([-0.02], below_zero) == "met (one seed: spread not measured)"


# Settings the payoff refuses, and where it switches.

def test_switch_step_is_the_share_rounded_down_to_an_eval_step():
    assert switch_step(600, 100, 0.5) == 300
    assert switch_step(600, 100, 0.45) == 200
    assert switch_step(600, 100, 0.1) == 100  # at least one eval interval
    assert switch_step(10, 0, 0.5) == 5


@pytest.mark.parametrize("flags, message", [
    (["--expert_init", "copy"], "--expert_init is set by the payoff"),
    (["--num_experts", "6", "--top_k", "4"], "num_experts (6) must be a multiple of top_k (4)"),
    (["--max_steps", "10", "--eval_steps", "10"], "eval_steps (10) must be below max_steps (10)"),
    (["--plan"], "--plan prints one run's preflight plan and trains nothing"),
    (["--reset_optimizer"], "--reset_optimizer is set by the payoff"),
])
def test_settings_the_payoff_cannot_compare_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_grid(parse_args(flags), flags, 0.5, None, 1, 1)
