"""A run's checkpoints/ folder and its rules: tag names, which tags are complete, `latest`, retention, and the names of
the files inside a tag. Training saves and resumes through it (training/checkpoint.py), export and the payoff read
through it. Part of the run folder's one owner (run/folder.py).

    checkpoints/
      latest                      the newest COMPLETE tag; replaced atomically (write + rename)
      global_step{N}/
        mp_rank_00_model_states.pt, layer_{L}_expert_{E}_*.pt, *optim_states.pt   (DeepSpeed)
        rng_rank{R}.pt            every RNG of rank R (python, numpy, torch, CUDA)
        data_rank{R}.json         where rank R's next batch starts (a stream's position differs per rank)
        complete.json             written last, after every rank finished: step, world and ep sizes, moe_impl

DeepSpeed writes `latest` itself before all ranks are known to be done, and does not say when a tag is complete, so
both are done here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .writes import atomic_write

COMPLETE = "complete.json"
LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's: the non-expert weights, LR schedule and client state
TAG_PREFIX = "global_step"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class CheckpointFolder:
    """One checkpoints/ folder (a train.py run's, or the DeepSpeed checkpoint inside an MoETrainer folder)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- tags ----------------------------------------------------------------------------------------------------

    @staticmethod
    def tag_of(step: int) -> str:
        return f"{TAG_PREFIX}{step}"

    @staticmethod
    def step_of(tag_dir: Path) -> int:
        return int(tag_dir.name.removeprefix(TAG_PREFIX))

    @staticmethod
    def is_tag(path: Path) -> bool:
        return path.name.startswith(TAG_PREFIX)

    def tag_dir(self, step: int) -> Path:
        return self.path / self.tag_of(step)

    def tags(self) -> list[Path]:
        """Every tag folder, complete or not."""
        return [p for p in self.path.glob(f"{TAG_PREFIX}*") if p.is_dir()]

    def complete_tags(self) -> list[Path]:
        """Tag folders whose save finished on every rank, oldest first."""
        return sorted((p for p in self.tags() if (p / COMPLETE).is_file()), key=self.step_of)

    def has_latest(self) -> bool:
        return (self.path / LATEST).is_file()

    def latest(self) -> Path | None:
        """The tag folder `latest` names (always a complete one), or None before the first save."""
        latest = self.path / LATEST
        return self.path / latest.read_text().strip() if latest.is_file() else None

    # -- completeness and retention ------------------------------------------------------------------------------

    def mark_complete(self, tag_dir: Path, meta: dict) -> None:
        """After every rank wrote its files: the tag gets complete.json, then becomes `latest` (each atomically)."""
        atomic_write(tag_dir / COMPLETE, json.dumps(meta) + "\n")
        atomic_write(self.path / LATEST, tag_dir.name)

    def check_complete(self, tag_dir: Path) -> dict:
        """The tag's complete.json; a CheckpointError that points to the previous good tag when it has none."""
        if not (tag_dir / COMPLETE).is_file():
            raise CheckpointError(f"{tag_dir} is incomplete (no {COMPLETE}: its save was interrupted); "
                                  f"{self.previous_good(tag_dir)}")
        return json.loads((tag_dir / COMPLETE).read_text())

    def previous_good(self, tag_dir: Path) -> str:
        older = [t for t in self.complete_tags() if self.step_of(t) < self.step_of(tag_dir)]
        return (f"use the previous good checkpoint {older[-1]}" if older
                else "no earlier complete checkpoint exists: start over without --resume_from_checkpoint")

    def prune(self, keep: int) -> list[Path]:
        """Delete all but the newest `keep` complete tags; never the one `latest` names. Returns what was deleted."""
        latest = self.latest()
        tags = self.complete_tags()
        doomed = [t for t in tags[:max(len(tags) - keep, 0)] if t != latest]
        for tag_dir in doomed:
            shutil.rmtree(tag_dir)
        return doomed

    # -- the files of a tag --------------------------------------------------------------------------------------

    @staticmethod
    def model_states(tag_dir: Path) -> Path:
        return tag_dir / MODEL_STATES

    @staticmethod
    def rng_file(tag_dir: Path, rank: int) -> Path:
        return tag_dir / f"rng_rank{rank}.pt"

    @staticmethod
    def data_position_file(tag_dir: Path, rank: int) -> Path:
        return tag_dir / f"data_rank{rank}.json"

    @staticmethod
    def torch_files(tag_dir: Path) -> list[Path]:
        return sorted(tag_dir.glob("*.pt"))

    # -- what --resume_from_checkpoint names ---------------------------------------------------------------------

    def resolve(self, spec: str) -> Path | None:
        """The tag folder to resume from, or None when `spec` is "latest" and this folder has no checkpoint yet.

        `spec`: "latest" (this folder's `latest`), another checkpoints folder (its `latest`), or a tag folder.
        """
        if spec == "latest":
            return self.latest()
        path = Path(spec)
        if (path / LATEST).is_file():
            return CheckpointFolder(path).latest()
        if path.is_dir() and self.is_tag(path):
            return path
        if path.is_dir() and CheckpointFolder(path).tags():
            complete = CheckpointFolder(path).complete_tags()
            raise CheckpointError(
                f"checkpoints folder {spec!r} has no `latest` file (it is written after the first complete save); "
                + (f"pass a tag folder instead, e.g. --resume_from_checkpoint {complete[-1]}" if complete else
                   "none of its tags is complete either: start over without --resume_from_checkpoint"))
        raise CheckpointError(f"resume_from_checkpoint {spec!r} is not a checkpoints folder (with a `latest` file) "
                              "or a tag folder (checkpoints/global_step{N}); use 'latest' for this run's newest "
                              "checkpoint")
