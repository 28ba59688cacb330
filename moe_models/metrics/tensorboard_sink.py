"""Rows to TensorBoard event files (rank 0): every number as a scalar under its metrics.jsonl key, at each eval the
expert-load and domain x expert heatmaps as images, and router-collapse warnings as text."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from .domain_heatmap import domain_experts_figure
from .expert_load import expert_load_figure, figure_pixels


class TensorboardSink:
    """A SummaryWriter on ``log_dir`` (output_dir/tensorboard). Lists (per-expert counts) are left out: the heatmap
    shows them."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.writer: SummaryWriter | None = None

    def start(self, step: int) -> None:
        """A resumed run (``step`` > 0) purges what an earlier run logged after ``step``: those steps come again."""
        self.writer = SummaryWriter(str(self.log_dir), purge_step=step + 1 if step else None)

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["step"])

    def log_expert_load(self, train_row: dict, eval_row: dict) -> None:
        self.writer.add_image("moe/expert_load", figure_pixels(expert_load_figure(train_row)), eval_row["step"],
                              dataformats="HWC")

    def log_domain_routes(self, eval_row: dict, domains: list[str]) -> None:
        self.writer.add_image("moe/domain_experts", figure_pixels(domain_experts_figure(eval_row, domains)),
                              eval_row["step"], dataformats="HWC")

    def alert(self, title: str, text: str, step: int) -> None:
        self.writer.add_text("moe/collapse_warnings", f"**{title}**: {text}", step)

    def close(self, summary: dict | None = None) -> None:
        self.writer.close()
