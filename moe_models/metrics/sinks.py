"""Where metrics go: metrics.jsonl (always), the console, and with --report_to wandb and/or tensorboard; rank 0 only.

The trainer talks to `Sinks`, which hands each row to every sink, at each eval the expert load to the reporters, and
the router-collapse warnings a training row starts or clears (training/bookkeeping.py checks them) to all of them.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from ..run.config import LogConfig, RunConfig
from ..run.folder import MetricsFile
from .collapse import console_line
from .domain_heatmap import layers_with_domain_counts
from .rows import layer_values, moe_layer_ids


class MetricsLog:
    """Appends one JSON object per row to metrics.jsonl (the run folder's ``MetricsFile``); silent on ranks other
    than 0. ``rows``: the rows this process logged."""

    def __init__(self, path: Path, enabled: bool):
        self.file = MetricsFile(path)
        self.enabled = enabled
        self.rows: list[dict] = []

    def drop_after(self, step: int) -> list[dict]:
        """On resume: forget rows logged after the checkpoint's step (they will be logged again); returns the rows
        kept ([] on other ranks)."""
        return self.file.keep_until(step) if self.enabled else []

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            self.file.append(row)


class Progress:
    """Rank 0's console: a tqdm bar over optimizer steps with loss and the last logging interval's tokens/s (tqdm
    shows the ETA; the summary's tokens/s is the whole run's), and at every eval the eval loss plus one expert-load
    line per MoE layer from the latest training row."""

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
                self.bar.set_postfix({"loss": f"{row['loss']:.3f}",
                                      "tok/s (last interval)": f"{row['tokens_per_sec']:.0f}"}, refresh=False)
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


def bars(values: list[float]) -> str:
    """Values as block characters scaled to the largest (a sparkline; wandb's is private API, so not reused)."""
    blocks = "▁▂▃▄▅▆▇█"
    top = max(values) or 1
    return "".join(blocks[min(7, int(8 * v / top))] for v in values)


class Sinks:
    """Hands every row to metrics.jsonl, the console and the reporters (wandb, tensorboard); at each eval, the
    expert load of the latest training row and the eval row to the reporters as a table and a heatmap, and the eval
    row's routes per (domain, expert) as heatmaps (rows named by ``domains``); the router-collapse warnings a training
    row starts or clears (``warn``) to metrics.jsonl and the console, and a warning's start to the reporters as an
    alert."""

    def __init__(self, jsonl: MetricsLog, console: Progress, wandb=None, tensorboard=None,
                 domains: Sequence[str] = ()):
        self.jsonl, self.console, self.wandb, self.tensorboard = jsonl, console, wandb, tensorboard
        self.domains = list(domains)
        self.last_training_row: dict = {}

    @property
    def reporters(self) -> list:
        return [reporter for reporter in (self.wandb, self.tensorboard) if reporter]

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run's id (saved in checkpoints); None without wandb or before `start`."""
        return self.wandb.run.id if self.wandb and self.wandb.run else None

    @wandb_run_id.setter
    def wandb_run_id(self, run_id: str | None) -> None:
        """Before `start`: continue that wandb run (a resumed checkpoint's client_state["wandb_run_id"])."""
        if self.wandb:
            self.wandb.run_id = run_id

    def resume(self, step: int) -> list[dict]:
        """A run resumed at ``step``: metrics.jsonl drops what was logged after it; returns the training rows kept, for
        the collapse monitor to read, so that it goes on as in a run that was never stopped (no second warning of a
        condition that held at the stop)."""
        return [row for row in self.jsonl.drop_after(step) if "loss" in row]

    def start(self, step: int) -> None:
        """Open the console bar at ``step`` and the reporters; call before the first training step."""
        self.console.start(step)
        for reporter in self.reporters:
            reporter.start(step)

    def log(self, row: dict) -> None:
        self.jsonl.write(row)
        self.console.log(row)
        for reporter in self.reporters:
            reporter.log(row)
        if "loss" in row:
            self.last_training_row = row
        if "eval_loss" in row and moe_layer_ids([self.last_training_row]):
            for reporter in self.reporters:
                reporter.log_expert_load(self.last_training_row, row)
        if "eval_loss" in row and layers_with_domain_counts(row):
            for reporter in self.reporters:
                reporter.log_domain_routes(row, self.domains)

    def warn(self, warnings: list[dict]) -> None:
        """Router-collapse warning and clearance rows (metrics/collapse.py): written, printed, a start alerted."""
        for warning in warnings:
            self.jsonl.write(warning)
            self.console.print(console_line(warning))
            if warning["collapse"] == "warning":
                for reporter in self.reporters:
                    reporter.alert(f"Router collapse: MoE layer {warning['layer']}, {warning['condition']}",
                                   warning["message"], warning["step"])

    def close(self, summary: dict | None = None) -> None:
        """Close the console and the reporters; ``summary`` (the finished run's, None after an error) goes to wandb's
        run summary."""
        self.console.close()
        for reporter in self.reporters:
            reporter.close(summary)


REPORT_TARGETS = ("wandb", "tensorboard")


def report_targets(report_to: str) -> list[str]:
    """--report_to as names: "none" -> [], "wandb,tensorboard" -> both (any letter case, spaces and repeats
    ignored)."""
    names = list(dict.fromkeys(name.strip().lower() for name in report_to.split(",") if name.strip()))
    return [] if names == ["none"] else names


def open_sinks(cfg: RunConfig, is_main: bool, output_dir: Path, jsonl: MetricsLog,
               domains: Sequence[str] = ()) -> Sinks:
    """The run's sinks around its metrics.jsonl log: the console, and the --report_to reporters (rank 0); ``domains``
    names the rows of the domain x expert heatmaps."""
    targets = report_targets(cfg.log.report_to) if is_main else []
    wandb = tensorboard = None
    if "wandb" in targets:
        from .wandb_sink import WandbSink  # imports wandb only when it is used
        wandb = WandbSink(cfg, output_dir)
    if "tensorboard" in targets:
        from .tensorboard_sink import TensorboardSink  # imports tensorboard only when it is used
        tensorboard = TensorboardSink(output_dir / "tensorboard")
    return Sinks(jsonl, Progress(cfg.train.max_steps, enabled=is_main and not cfg.train.disable_tqdm, is_main=is_main),
                 wandb, tensorboard, domains)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def log_problems(log: LogConfig) -> list[str]:
    problems = []
    if log.peak_tflops is not None and log.peak_tflops <= 0:
        problems.append(f"peak_tflops ({log.peak_tflops}) must be > 0, or leave it out")
    minimums = {"collapse_effective_experts": 0, "collapse_imbalance": 0, "collapse_imbalance_of_max": 0,
                "collapse_dead_expert_share": 0, "collapse_logit_norm_intervals": 0, "collapse_logit_norm_growth": 1,
                "collapse_logit_rms": 0, "collapse_min_tokens": 0}
    problems += [f"{name} ({getattr(log, name)}) must be >= {low}" for name, low in minimums.items()
                 if getattr(log, name) < low]
    fractions = {"collapse_effective_experts": "a layer's experts", "collapse_imbalance_of_max": "the way from an "
                 "even load to the largest imbalance", "collapse_dead_expert_share": "an even share"}
    problems += [f"{name} ({getattr(log, name)}) is a fraction of {what}: give a value from 0 (off) to 1"
                 for name, what in fractions.items() if getattr(log, name) > 1]
    targets = report_targets(log.report_to)
    unknown = [name for name in targets if name not in REPORT_TARGETS]
    if unknown or not log.report_to.strip():
        problems.append(f"report_to {log.report_to!r} names {', '.join(unknown) or 'nothing'}: use none, wandb, "
                        "tensorboard, or both as wandb,tensorboard")
    elif "tensorboard" in targets and importlib.util.find_spec("tensorboard") is None:
        problems.append("report_to tensorboard needs the tensorboard package, which is not installed: pip install -c "
                        "constraints.txt \".[tensorboard]\" in a source checkout (pip install \"moe-models[tensorboard]\" "
                        "elsewhere), or leave tensorboard out of --report_to")
    return problems
