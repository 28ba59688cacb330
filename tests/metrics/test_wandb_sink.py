"""Real offline wandb runs from train.py, read back with wandb's own reader of .wandb files and the run folder's
media files."""

import json
import math
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from moe_models.run.cli import parse_args
from moe_models.metrics.sinks import MetricsLog, open_sinks
from moe_models.metrics.wandb_sink import wandb_values
from train import main

FLAGS = ["--num_experts", "4", "--max_steps", "4", "--logging_steps", "2", "--eval_steps", "4", "--max_eval_batches",
         "2", "--warmup_steps", "1", "--synthetic_examples", "600", "--block_size", "32",
         "--per_device_train_batch_size", "4", "--disable_tqdm"]


def wandb_records(run_dir, *flags: str) -> list[dict]:
    """`wandb leet inspect --json`: one JSON object per record of the run's .wandb transaction log."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json", *flags],
                            capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def test_offline_run_holds_the_config_and_the_metrics(world, tmp_path, capsys, no_wandb_credentials):
    out = tmp_path / "run"
    main([*FLAGS, "--output_dir", str(out), "--report_to", "wandb", "--wandb_project", "moe-test",
          "--wandb_run_name", "tiny", "--wandb_tags", "ci,metrics"])
    printed = capsys.readouterr().out
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    assert "wandb: logging offline (no API key: set WANDB_API_KEY or run `wandb login`)" in printed
    assert f"wandb sync {run_dirs[0]}" in printed

    history = [r["history"]["item"] for r in wandb_records(run_dirs[0]) if r["type"] == "history"]
    assert [h["_step"] for h in history] == [1, 2, 4]
    train_keys = ["loss", "aux_loss", "lr", "grad_norm", "tokens_per_sec", "tokens_per_sec_per_device", "step_time",
                  "tokens_seen", "skipped_steps", "cpu_rss_gib", "moe/layer_0/drop_fraction",
                  "moe/layer_3/router_entropy", "moe/layer_1/imbalance", "moe/layer_2/aux_loss",
                  "moe/layer_0/routed_tokens", "moe/layer_0/dropped"]
    for item in history:
        assert all(key in item for key in train_keys), set(train_keys) - set(item)
        assert item["moe/layer_0/tokens_per_expert._type"] == "histogram"
        assert item["moe/layer_0/tokens_per_expert.bins"] == [0, 1, 2, 3, 4]  # one bin per expert id
        assert sum(item["moe/layer_0/tokens_per_expert.values"]) == \
            item["moe/layer_0/routed_tokens"] * 2 - item["moe/layer_0/dropped"]
    assert {"eval_loss", "perplexity", "moe/layer_0/expert_similarity"} <= set(history[-1])  # same step as train

    summary = json.loads(subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dirs[0]),
                                         "--summary", "--json"], capture_output=True, text=True, timeout=120,
                                        check=True).stdout)
    assert summary["project"] == "moe-test" and summary["name"] == "tiny" and summary["tags"] == ["ci", "metrics"]
    assert summary["config"]["moe"]["num_experts"] == 4 and summary["config"]["log"]["report_to"] == "wandb"
    assert summary["config"]["resolved"]["world_size"] == 1  # run_config.json, resolved values included

    client = torch.load(out / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["wandb_run_id"] == summary["run_id"]


def test_a_resumed_run_continues_its_wandb_run(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = parse_args(["--report_to", "wandb", "--max_steps", "2"])
    sinks = open_sinks(cfg, is_main=True, output_dir=tmp_path, jsonl=MetricsLog(tmp_path / "m.jsonl", enabled=True))
    sinks.wandb_run_id = "resume42"  # what a resume sets from client_state["wandb_run_id"]
    sinks.start(step=1)
    sinks.log({"step": 2, "loss": 1.0, "tokens_per_sec": 10.0})
    sinks.close()
    assert sinks.wandb_run_id == "resume42"
    assert list((tmp_path / "wandb").glob("offline-run-*-resume42"))


def test_only_rank_0_reports_to_wandb(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)
    assert open_sinks(parse_args(["--report_to", "wandb"]), is_main=False, output_dir=tmp_path, jsonl=log).wandb is None
    assert open_sinks(parse_args([]), is_main=True, output_dir=tmp_path, jsonl=log).wandb is None


def test_per_expert_lists_become_histograms_over_expert_ids():
    values = wandb_values({"step": 3, "loss": 2.0, "moe/layer_1/tokens_per_expert": [5, 0, 7],
                           "moe/layer_1/routed_per_expert": [6, 1, 7]})
    assert set(values) == {"loss", "moe/layer_1/tokens_per_expert", "moe/layer_1/routed_per_expert"}
    histogram = values["moe/layer_1/tokens_per_expert"]
    assert histogram.histogram == [5, 0, 7] and np.array_equal(histogram.bins, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def reported_run(world, tmp_path_factory):
    """A 4-step run with evals at steps 2 and 4, reporting to wandb (offline) and tensorboard."""
    out = tmp_path_factory.mktemp("reported") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        main([*FLAGS, "--eval_steps", "2", "--output_dir", str(out), "--report_to", "wandb,tensorboard"])
    run_dir, = (out / "wandb").glob("offline-run-*")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, run_dir, rows


def test_each_eval_logs_the_expert_load_and_the_domain_routes_as_images_and_a_table(reported_run):
    out, run_dir, rows = reported_run
    training = {r["step"]: r for r in rows if "loss" in r}
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    logged = [r["history"]["item"] for r in wandb_records(run_dir) if r["type"] == "history"]
    at_evals = [item for item in logged if "moe/routing.path" in item]
    assert [item["_step"] for item in at_evals] == sorted(evals) == [2, 4]
    for item in at_evals:
        step = item["_step"]
        for image in ("moe/expert_load", "moe/domain_experts"):  # domain x expert: the built-in corpus's domains
            assert item[f"{image}._type"] == "image-file"
            pixels = matplotlib.image.imread(run_dir / "files" / item[f"{image}.path"])
            assert pixels.shape[:2] == (item[f"{image}.height"], item[f"{image}.width"])
        table = json.loads((run_dir / "files" / item["moe/routing.path"]).read_text())
        assert table["columns"][:5] == ["layer", "expert", "routes", "share", "kept"]
        assert {"drop_fraction", "router_entropy", "imbalance", "expert_similarity"} <= set(table["columns"])
        lines = [dict(zip(table["columns"], line)) for line in table["data"]]
        assert len(lines) == 4 * 4  # MoE layers x experts
        for layer in range(4):
            mine = [line for line in lines if line["layer"] == layer]
            prefix = f"moe/layer_{layer}/"
            assert [line["routes"] for line in mine] == training[step][prefix + "routed_per_expert"]
            assert [line["kept"] for line in mine] == training[step][prefix + "tokens_per_expert"]
            assert sum(line["share"] for line in mine) == pytest.approx(1.0)
            assert {line["imbalance"] for line in mine} == {training[step][prefix + "imbalance"]}
            assert {line["expert_similarity"] for line in mine} == {evals[step][prefix + "expert_similarity"]}
            per_domain = {k: v for k, v in evals[step].items() if k.startswith(prefix + "real_experts_per_token/")}
            assert len(per_domain) >= 3 and all(item[key] == value for key, value in per_domain.items())


def test_the_run_holds_the_resolved_deepspeed_config_and_a_final_summary(reported_run):
    out, run_dir, rows = reported_run
    summary = json.loads(subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--summary",
                                         "--json"], capture_output=True, text=True, timeout=120, check=True).stdout)
    resolved = json.loads((out / "run_config.json").read_text())["resolved"]["deepspeed_config"]
    assert summary["config"]["resolved"]["deepspeed_config"] == resolved
    assert resolved["train_micro_batch_size_per_gpu"] == 4 and resolved["zero_optimization"]["stage"] == 1
    final = {key: value for key, value in summary["summary"].items() if key.startswith("final/")}
    losses = [r["loss"] for r in rows if "loss" in r]
    assert final["final/steps"] == 4 and final["final/tokens_seen"] == 4 * 4 * 32
    assert final["final/first_loss"] == losses[0] and final["final/last_loss"] == losses[-1]
    assert final["final/eval_loss"] == [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert final["final/tokens_per_sec"] > 0 and "final/stopped_by" not in final  # not stopped by a signal


def test_a_run_branched_from_another_runs_checkpoint_has_its_own_wandb_run_and_the_schedules_rate(reported_run,
                                                                                                  tmp_path):
    """--resume_from_checkpoint of another run's tag with --reset_optimizer (the payoff's fair dense continuation):
    a wandb run of its own, not the other run's, and the first step after the load at the rate of the schedule
    (a fresh optimizer holds the rate of the schedule's start until the schedule applies its own)."""
    out, run_dir, _ = reported_run
    branch = tmp_path / "branch"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        main([*FLAGS, "--max_steps", "8", "--warmup_steps", "2", "--logging_steps", "1", "--output_dir", str(branch),
              "--resume_from_checkpoint", str(out / "checkpoints" / "global_step4"), "--reset_optimizer",
              "--report_to", "wandb"])
    branch_run, = (branch / "wandb").glob("offline-run-*")
    assert branch_run.name.split("-")[-1] != run_dir.name.split("-")[-1]
    assert not list((out / "wandb").glob("offline-run-*"))[1:]  # the other run's folder got no second run
    # DeepSpeed's WarmupCosineLR (linear warm-up of W steps, then cosine to min_lr_ratio over T - W): step s applies
    # the rate at iteration s - 2 (its first step() comes after step 1).
    lr, warmup, total, floor = 1e-3, 2, 8, 0.1
    def rate(step):
        i = step - 2
        if i < warmup:
            return lr * max(i, 0) / warmup
        progress = min(1.0, (i - warmup + 1) / (total - warmup))
        return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)
    logged = {r["step"]: r["lr"] for r in map(json.loads, (branch / "metrics.jsonl").open()) if "lr" in r}
    assert sorted(logged) == [5, 6, 7, 8]
    assert logged[5] > 0
    assert logged == pytest.approx({s: rate(s) for s in logged}, rel=1e-9)
