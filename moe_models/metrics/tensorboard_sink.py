"""Rows to TensorBoard event files (rank 0): every number as a scalar under its metrics.jsonl key, and at each eval
the expert-load heatmap as an image."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

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

    def close(self, summary: dict | None = None) -> None:
        self.writer.close()
