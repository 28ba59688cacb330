"""The training loop end to end: the default CLI, outputs on disk, errors, file data, the balance loss."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from moe_models.run.cli import parse_args
from moe_models.run.config import RunConfig
from moe_models.data.batches import TrainBatches
from moe_models.data.text import load_text_datasets, pack_blocks
from moe_models.training.ds_config import build_deepspeed_config
from moe_models.moe.layer import moe_layers_of
from moe_models.moe.surgery import convert_to_moe
from moe_models.models.tokenization import byte_level_tokenizer
from moe_models.training.engine import build_engine
from moe_models.run.folder import RunFolder
from moe_models.training.loop import TrainLoop
from helpers import REPO, child_env, tiny_model



def run_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env(PYTHONPATH=str(REPO)))


# The lines a run prints itself, by their beginnings: a line that begins otherwise is another library's.
OUR_LINES = re.compile(r"start-up: |step \d+: |  moe layer \d+: |mfu not reported: |Done: |Outputs in |Report \(|"
                       r"Export \(|router collapse warning, |\{\"steps\": ")
# A progress bar (tqdm's, also datasets' own for its steps), on stderr: redrawn in place on a terminal.
PROGRESS_BAR = re.compile(r".*\|.*\| \d+/\d+ \[")


def not_ours(result: subprocess.CompletedProcess) -> list[str]:
    """The console lines of a run that other libraries printed (progress bars aside)."""
    lines = result.stdout.splitlines() + [line for line in re.split(r"[\r\n]", result.stderr)
                                          if not PROGRESS_BAR.match(line)]
    return [line for line in lines if line.strip() and not OUR_LINES.match(line)]


@pytest.mark.slow
def test_default_cli_trains_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    result = run_train("--max_steps", "60", "--logging_steps", "10", "--eval_steps", "30", "--output_dir", str(out),
                       "--num_experts", "4", "--disable_tqdm")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done: 60 steps, loss" in result.stdout
    assert not_ours(result) == []  # DeepSpeed's lines of every run are dropped (run/library_noise.py)
    assert (f"Export (an HF model and its tokenizer): python -m moe_models.export --checkpoint {out / 'checkpoints'} "
            f"--output {out}-hf") in result.stdout.splitlines()
    assert f"Report (plots, summary.txt): python -m moe_models.report {out}" in result.stdout.splitlines()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in eval_rows] == [30, 60]
    for row in train_rows:
        assert {"step", "loss", "aux_loss", "lr", "tokens_per_sec", "grad_norm", "tokens_seen"} <= set(row)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0  # starts near ln(257) = 5.55
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]

    config = json.loads((out / "run_config.json").read_text())
    assert config["moe"]["num_experts"] == 4 and config["train"]["max_steps"] == 60
    assert config["resolved"]["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 8

    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "global_step60"
    expert_files = sorted(p.name for p in (checkpoints / "global_step60").glob("layer_*_expert_*_model_states.pt"))
    assert len(expert_files) == 4 * 4  # one file per (MoE layer, global expert)
    client = torch.load(checkpoints / "global_step60" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["step"] == 60 and client["tokens_seen"] == 60 * 8 * 128

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.decode(tokenizer("37+48=85")["input_ids"]) == "37+48=85"


def test_bad_settings_fail_fast_with_every_problem(tmp_path):
    result = run_train("--num_experts", "6", "--ep_size", "4", "--top_k", "7", "--train_file", "nope.csv",
                       "--output_dir", str(tmp_path / "run"))
    assert result.returncode != 0
    for expected in ["num_experts (6) must be divisible by ep_size (4)", "top_k (7) must be <= num_experts (6)",
                     "ep_size (4) must divide the number of ranks (1)", "train_file 'nope.csv' does not exist"]:
        assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the settings are right


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_training_on_a_user_file(world, tmp_path, suffix):
    texts = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}" for i in range(400)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    else:
        path.write_text("body,id\n" + "\n".join(f"{t},{i}" for i, t in enumerate(texts)))
    cfg = parse_args(["--train_file", str(path), "--text_column", "body", "--block_size", "32", "--max_steps", "15",
                      "--logging_steps", "5", "--eval_steps", "0", "--num_experts", "2", "--output_dir",
                      str(tmp_path / "run"), "--disable_tqdm", "--warmup_steps", "2"])
    summary = train_in_process(cfg, world, tmp_path / "run")
    assert summary["last_loss"] < summary["first_loss"]


def train_in_process(cfg: RunConfig, world, output_dir: Path) -> dict:
    tokenizer = byte_level_tokenizer()
    model = convert_to_moe(tiny_model().train(), cfg.moe, seed=cfg.train.seed)
    data = pack_blocks(load_text_datasets(cfg.data, seed=0), tokenizer, cfg.data.block_size, cfg.data.text_column)
    batches = TrainBatches(data["train"], cfg.train.per_device_train_batch_size, 0, 1, seed=0)
    engine = build_engine(model, build_deepspeed_config(cfg, world_size=1), cfg.train.weight_decay)
    output_dir.mkdir(parents=True, exist_ok=True)
    return TrainLoop(cfg, engine, world, batches, data["validation"], RunFolder(output_dir)).train()


def test_balance_loss_coefficient_reaches_the_update(world, tmp_path):
    """Same model, data and seed; only aux_loss_coef differs -> the router updates differ.

    With copied experts the LM loss barely depends on the router (every expert computes the same
    function and the top-k weights sum to 1), so the balance loss is what moves the router at first."""
    def routers_after_three_steps(coef: float) -> list[torch.Tensor]:
        cfg = parse_args(["--aux_loss_coef", str(coef), "--num_experts", "4", "--max_steps", "4", "--warmup_steps",
                          "1", "--learning_rate", "1e-2", "--synthetic_examples", "400", "--eval_steps", "0", "--disable_tqdm",
                          "--output_dir", str(tmp_path / str(coef))])
        tokenizer = byte_level_tokenizer()
        model = convert_to_moe(tiny_model().train(), cfg.moe, seed=0)
        data = pack_blocks(load_text_datasets(cfg.data, seed=0), tokenizer, 128, "text")
        engine = build_engine(model, build_deepspeed_config(cfg, world_size=1), cfg.train.weight_decay)
        trainer = TrainLoop(cfg, engine, world, TrainBatches(data["train"], 8, 0, 1, seed=0), data["validation"],
                             RunFolder(tmp_path))
        for _ in range(3):  # DeepSpeed's WarmupCosineLR gives lr 0 to the first two steps
            trainer.train_step()
        return [layer.router.wg.weight.detach().clone() for layer in moe_layers_of(engine.module)]

    without, again, with_aux = routers_after_three_steps(0.0), routers_after_three_steps(0.0), routers_after_three_steps(1.0)
    assert all(torch.equal(a, b) for a, b in zip(without, again))  # deterministic, so the comparison means something
    assert any(not torch.allclose(a, b) for a, b in zip(without, with_aux))


def test_debug_script_runs_the_same_path(tmp_path):
    out = tmp_path / "debug"
    result = subprocess.run(["bash", "launch/debug_single_gpu.sh", "--max_steps", "3", "--synthetic_examples", "500",
                             "--num_experts", "2"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=child_env(PYTHONPATH=str(REPO), OUTPUT_DIR=str(out),
                                          PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # --logging_steps 1
    assert json.loads((out / "run_config.json").read_text())["train"]["per_device_train_batch_size"] == 2
    # the start-up phases, in order, each with its seconds: nothing before the first step is silent
    phases = ["imports", "settings checked", "process group", "tokenizer", "model built and converted", "data",
              "engine"]
    lines = [line for line in result.stdout.splitlines() if line.startswith("start-up: ")]
    timed = [line for line in lines if re.fullmatch(r"start-up: .+ \d+\.\d s", line)]
    assert [line[len("start-up: "):].rsplit(" ", 2)[0] for line in timed] == phases, lines
    assert any(line.startswith("start-up: CPU threads: ") for line in lines)
    assert "note: " not in result.stdout  # the default run exports exactly: no early note
    assert "router collapse" not in result.stdout  # 2 x 128 tokens an interval: below --collapse_min_tokens
    # the libraries' lines: DeepSpeed's of every run are dropped, a real warning (3 steps, 10 of warmup) still shows
    assert [line.split("] ")[-1] for line in not_ours(result)] == ["total_num_steps 3 is less than warmup_num_steps 10"]


@pytest.mark.slow
def test_zero2_with_optimizer_offload(world, tmp_path):
    cfg = parse_args(["--deepspeed", "zero2_offload", "--max_steps", "6", "--warmup_steps", "1", "--eval_steps", "0",
                      "--synthetic_examples", "1000", "--num_experts", "2", "--disable_tqdm",
                      "--output_dir", str(tmp_path / "run")])
    summary = train_in_process(cfg, world, tmp_path / "run")
    assert summary["last_loss"] < summary["first_loss"]
