"""Rows to a Weights & Biases run (rank 0), offline when no API key is configured; at each eval the expert load as an
image and a table, and the routes per (domain, expert) as an image; router-collapse warnings as alerts; the finished
run's summary."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import wandb

from ..run.config import RunConfig
from ..run.folder import RunFolder
from .domain_heatmap import domain_experts_figure
from .expert_load import expert_load_figure, figure_pixels, routing_table

PER_EXPERT_KEYS = ("tokens_per_expert", "routed_per_expert", "real_experts_histogram")  # counts by bin (bin 0, 1, ...)


class WandbSink:
    """Scalars go to the run's history; per-expert lists become histograms whose bins are the expert ids,
    which wandb draws over steps as a heatmap (x: expert, y: step, colour: tokens). At each eval, the expert load
    of every MoE layer as an image (moe/expert_load) and a table (moe/routing); at the end, the run's summary under
    final/ in the run summary."""

    def __init__(self, cfg: RunConfig, output_dir: Path):
        self.cfg, self.output_dir = cfg, output_dir
        self.run_id: str | None = None  # set before start() to continue that run
        self.run: wandb.Run | None = None

    def start(self, step: int) -> None:
        """Open (or, with run_id set, continue) the run; its history continues at the rows' own steps."""
        log = self.cfg.log
        mode, offline_reason = wandb_mode()
        self.run = wandb.init(
            project=log.wandb_project or os.environ.get("WANDB_PROJECT", "moe-models"), entity=log.wandb_entity,
            name=log.wandb_run_name, tags=log.wandb_tags.split(",") if log.wandb_tags else None,
            config=run_config(self.cfg, self.output_dir), dir=self.output_dir, mode=mode,
            id=self.run_id, resume="allow" if self.run_id else None)
        if self.run.offline:
            sync_dir = self.run.settings.sync_dir
            print(f"wandb: logging offline ({offline_reason}) to {sync_dir}\n"
                  f"wandb: upload it later with: wandb sync {sync_dir}", flush=True)

    def log(self, row: dict) -> None:
        self.run.log(wandb_values(row), step=row["step"])

    def log_expert_load(self, train_row: dict, eval_row: dict) -> None:
        columns, rows = routing_table(train_row, eval_row)
        image = wandb.Image(figure_pixels(expert_load_figure(train_row)),
                            caption=f"routes per expert, share of each MoE layer's routes (step {train_row['step']})")
        self.run.log({"moe/expert_load": image, "moe/routing": wandb.Table(columns=columns, data=rows)},
                     step=eval_row["step"])

    def log_domain_routes(self, eval_row: dict, domains: list[str]) -> None:
        image = wandb.Image(figure_pixels(domain_experts_figure(eval_row, domains)),
                            caption=f"routes per (domain, expert) of each MoE layer at eval (step {eval_row['step']})")
        self.run.log({"moe/domain_experts": image}, step=eval_row["step"])

    def alert(self, title: str, text: str, step: int) -> None:
        """A wandb alert (e-mail or Slack as the user's wandb settings say; an offline run records it, and `wandb
        sync` uploads it)."""
        self.run.alert(title=title, text=f"step {step}: {text}", level=wandb.AlertLevel.WARN)

    def close(self, summary: dict | None = None) -> None:
        if summary:
            self.run.summary.update(final_summary(summary))
        self.run.finish()


def final_summary(summary: dict) -> dict:
    """The finished run's summary (steps, first and last loss, eval loss, tokens, tokens/s, seconds, what stopped it)
    under final/, beside the latest value of each logged key that wandb keeps in the run summary itself."""
    return {f"final/{key}": value for key, value in summary.items() if value is not None}


def wandb_mode() -> tuple[str, str]:
    """(mode for wandb.init, why it would be offline): WANDB_MODE when set; else online with credentials
    (WANDB_API_KEY, .netrc, wandb settings), offline without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], f"WANDB_MODE={os.environ['WANDB_MODE']}"
    if wandb.login(prompt=False, verify=False):
        return "online", ""
    return "offline", "no API key: set WANDB_API_KEY or run `wandb login`"


def run_config(cfg: RunConfig, output_dir: Path) -> dict:
    """The run record as train.py wrote it (the settings and what they resolved to), else the settings."""
    folder = RunFolder(output_dir)
    return folder.record().to_dict() if folder.holds_run() else cfg.to_dict()


def wandb_values(row: dict) -> dict:
    """The row without its step, per-expert counts as histograms over expert ids, other lists as histograms of
    their values."""
    values = {}
    for key, value in row.items():
        if key == "step":
            continue
        if key.endswith(PER_EXPERT_KEYS):
            value = wandb.Histogram(np_histogram=(np.asarray(value), np.arange(len(value) + 1)))
        elif isinstance(value, list):  # per-expert values that are not counts (score_bias): their distribution
            value = wandb.Histogram(value)
        values[key] = value
    return values
