"""Where metrics go: metrics.jsonl (always) and the console progress bar, on rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm


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
    """A tqdm bar over optimizer steps on rank 0; elsewhere it does nothing."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True) if enabled else None

    def advance(self) -> None:
        if self.bar:
            self.bar.update(1)

    def show(self, row: dict) -> None:
        if self.bar:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)

    def print(self, text: str) -> None:
        if self.bar:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
