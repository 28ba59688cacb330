"""Where metrics go: metrics.jsonl (always), the console, and wandb with --report_to wandb; rank 0 only.

The trainer talks to `Sinks`, which hands each row to every sink.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from tqdm.auto import tqdm

from ..config import LogConfig, RunConfig


class MetricsLog:
    """Appends one JSON object per row to metrics.jsonl; silent on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.rows: list[dict] = []

    def drop_after(self, step: int) -> None:
        """On resume: forget rows logged after the checkpoint's step (they will be logged again)."""
        if self.enabled and self.path.is_file():
            rows = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in rows))
            tmp.replace(self.path)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


class Progress:
    """Rank 0's console: a tqdm bar over optimizer steps with loss and tokens/s (tqdm shows the ETA), and at
    every eval the eval loss plus one expert-load line per MoE layer from the latest training row."""

    def __init__(self, total: int, enabled: bool, is_main: bool = True):
        self.total, self.enabled, self.is_main = total, enabled, is_main
        self.bar: tqdm | None = None
        self.last_training_row: dict = {}

    def start(self, step: int) -> None:
        if self.enabled:
            self.bar = tqdm(total=self.total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar:
            self.bar.update(1)

    def log(self, row: dict) -> None:
        if "loss" in row:
            self.last_training_row = row
            if self.bar:
                self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)
        if "eval_loss" in row:
            self.print(f"step {row['step']}: eval_loss {row['eval_loss']:.4f}  perplexity {row['perplexity']:.2f}")
            for line in expert_load_lines(self.last_training_row):
                self.print(line)

    def print(self, text: str) -> None:
        """A line on rank 0's console, above the bar when there is one."""
        if self.bar:
            self.bar.write(text)
        elif self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def expert_load_lines(row: dict) -> list[str]:
    """One line per MoE layer of a training row: router load per expert as bars, imbalance, drops, entropy."""
    lines = []
    for i in itertools.count():
        layer = layer_values(row, i)
        if "routed_per_expert" not in layer:
            return lines
        load = layer["routed_per_expert"]
        lines.append(f"  moe layer {i}: load {bars(load)}  imbalance {layer['imbalance']:.2f}  "
                     f"dropped {100 * layer['drop_fraction']:.1f}%  entropy {layer['router_entropy']:.2f}"
                     f"/{math.log(len(load)):.2f} nats")


def layer_values(row: dict, layer: int) -> dict:
    """The ``moe/layer_{layer}/...`` entries of a row, keyed by their last part."""
    prefix = f"moe/layer_{layer}/"
    return {key[len(prefix):]: value for key, value in row.items() if key.startswith(prefix)}


def bars(values: list[float]) -> str:
    """Values as block characters scaled to the largest (a sparkline; wandb's is private API, so not reused)."""
    blocks = "▁▂▃▄▅▆▇█"
    top = max(values) or 1
    return "".join(blocks[min(7, int(8 * v / top))] for v in values)


class Sinks:
    """Hands every row to metrics.jsonl, the console and (optionally) wandb."""

    def __init__(self, jsonl: MetricsLog, console: Progress, wandb=None):
        self.jsonl, self.console, self.wandb = jsonl, console, wandb

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run's id (saved in checkpoints); None without wandb or before `start`."""
        return self.wandb.run.id if self.wandb and self.wandb.run else None

    @wandb_run_id.setter
    def wandb_run_id(self, run_id: str | None) -> None:
        """Before `start`: continue that wandb run (a resumed checkpoint's client_state["wandb_run_id"])."""
        if self.wandb:
            self.wandb.run_id = run_id

    def start(self, step: int) -> None:
        """Open the console bar at ``step`` and the wandb run; call before the first training step."""
        self.console.start(step)
        if self.wandb:
            self.wandb.start()

    def log(self, row: dict) -> None:
        self.jsonl.write(row)
        self.console.log(row)
        if self.wandb:
            self.wandb.log(row)

    def close(self) -> None:
        self.console.close()
        if self.wandb:
            self.wandb.close()


def open_sinks(cfg: RunConfig, is_main: bool, output_dir: Path, jsonl: MetricsLog) -> Sinks:
    """The run's sinks around its metrics.jsonl log: the console, and wandb with --report_to wandb (rank 0)."""
    wandb = None
    if cfg.log.report_to == "wandb" and is_main:
        from .wandb_sink import WandbSink  # imports wandb only when it is used
        wandb = WandbSink(cfg, output_dir)
    return Sinks(jsonl, Progress(cfg.train.max_steps, enabled=is_main and not cfg.train.disable_tqdm, is_main=is_main),
                 wandb)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def log_problems(log: LogConfig) -> list[str]:
    if log.peak_tflops is not None and log.peak_tflops <= 0:
        return [f"peak_tflops ({log.peak_tflops}) must be > 0, or leave it out"]
    return []
