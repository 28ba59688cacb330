"""What several test modules share: the repository root, child-process environments, tiny models, the real
`deepspeed` launcher on CPU ranks (started, timed out, and its ranks' output shown on failure), and a non-editable
install of the project."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, set_seed

from moe_models.models.source import preset_config

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]
# accelerate (TrainingArguments) sets LOCAL_WORLD_SIZE in the test process too: a launched child must not inherit it
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict:
    """Environment for a subprocess: this one's, without the rank variables the `world` fixture set
    (a child must make or join its own process group), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return {**env, **extra}


def tiny_model(preset: str = "tiny-llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A small dense causal LM from a built-in preset, in eval mode (no dropout)."""
    set_seed(seed)
    config = preset_config(preset)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict:
    """The ranks' environment: CPU accelerator, one thread per rank, offline, this venv's `deepspeed` on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return child_env(**{"PATH": path, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra})


def finish(proc: subprocess.Popen, timeout: int) -> tuple[int, str]:
    """Wait for a launcher; on timeout kill its whole process group and fail with the ranks' output."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"launcher hung for {timeout} s; rank output:\n{output[-12000:]}")
    return proc.returncode, output


def start(command: list[str], cwd: Path = REPO, **env: str) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=launch_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def succeed(proc: subprocess.Popen, timeout: int = 300) -> str:
    code, output = finish(proc, timeout)
    assert code == 0, f"launcher exited {code}; rank output:\n{output[-12000:]}"
    return output


def launch(args: list[str], num_ranks: int = 2, timeout: int = 300, cwd: Path = REPO, **env: str) -> str:
    """Run the launcher to success; the ranks must not leave DeepSpeed's CPU all-reduce buffers in /dev/shm."""
    port = free_port()
    output = succeed(start([*LAUNCHER, "--num_gpus", str(num_ranks), "--master_port", str(port), *args], cwd, **env),
                     timeout)
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the ranks left {left} in /dev/shm"
    return output


def wait_for(condition, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def rank_process(launcher_pid: int, local_rank: int) -> psutil.Process:
    """The train.py process a launcher started for ``local_rank``."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        if f"--local_rank={local_rank}" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no process for local rank {local_rank} under launcher {launcher_pid}")


def saved(output_dir: Path) -> bool:
    """A checkpoint of the run is complete."""
    return (output_dir / "checkpoints" / "latest").is_file()


def logged_rows(output_dir: Path) -> dict[tuple[int, str], float]:
    """(step, "loss" or "eval_loss") -> the value metrics.jsonl holds."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], key): r[key] for r in rows for key in ("loss", "eval_loss") if key in r}


def install_project(folder: Path) -> Path:
    """`pip install .` (not editable, no dependencies, offline) of a copy of the package into folder/site, which
    holds the package and bin/ with the console scripts; returns folder/site. A copy, because the build writes
    build/ beside its sources; no train.py or tests, so what runs from site/ is the installed package alone."""
    source, site = folder / "source", folder / "site"
    shutil.copytree(REPO / "moe_models", source / "moe_models", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                              "--target", str(site), str(source)], capture_output=True, text=True, timeout=300,
                             env=child_env())
    assert install.returncode == 0, install.stderr
    return site


# -- MoETrainer (the transformers Trainer path) ------------------------------------------------------------------

# ZeRO-2 with every batch setting from TrainingArguments; no "optimizer" section, so the Trainer's AdamW is used.
ZERO2 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
         "gradient_clipping": "auto", "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
# Dropless, deterministic top-2 routing over 4 random experts: runs at any ep_size and their export compute alike.
EXACT_MOE = dict(num_experts=4, top_k=2, drop_tokens=False, top2_2nd_expert_sampling=False, expert_init="random")


def tiny_moe_model(seed: int = 0, **moe):
    """tiny-llama converted to MoE (EXACT_MOE, overridden by ``moe``), in training mode."""
    from moe_models import MoEConfig, convert_to_moe
    return convert_to_moe(tiny_model(seed=seed).train(), MoEConfig(**{**EXACT_MOE, **moe}), seed=seed)


def tiny_blocks(num_examples: int = 200, block_size: int = 32, seed: int = 0):
    """Packed blocks of the synthetic corpus (byte-level tokens) with labels = input_ids."""
    from datasets import DatasetDict
    from moe_models.data.synthetic import synthetic_corpus
    from moe_models.data.text import pack_blocks
    from moe_models.models.tokenization import byte_level_tokenizer
    raw = DatasetDict({"train": synthetic_corpus(num_examples, seed)})
    blocks = pack_blocks(raw, byte_level_tokenizer(), block_size, "text")["train"].select_columns(["input_ids"])
    return blocks.map(lambda batch: {"labels": batch["input_ids"]}, batched=True)


def trainer_args(output_dir, deepspeed: dict | None = None, **overrides):
    """TrainingArguments for a few CPU steps: log every step, no saves, no reporters, no progress bar."""
    from transformers import TrainingArguments
    values = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, learning_rate=3e-3,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                  deepspeed=deepspeed)
    return TrainingArguments(**{**values, **overrides})


def trainer_losses(log_history: list[dict]) -> dict[int, float]:
    """step -> the logged training loss."""
    return {row["step"]: row["loss"] for row in log_history if "loss" in row}
