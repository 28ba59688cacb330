"""A run's output folder, and the one owner of every file in it: nothing else in the package opens these files.

    OUTPUT_DIR/
      run_config.json     RunRecord: every setting, and what it resolved to ("resolved": world size, DeepSpeed JSON,
                          MoE layout, parameter counts, FLOPs per token, domains, data)
      metrics.jsonl       MetricsFile: one JSON row per line (training rows, eval rows, collapse warnings)
      tokenizer/          the tokenizer the run trained with
      base_model/         the dense model's HF config (config.json)
      checkpoints/        CheckpointFolder (run/checkpoint_folder.py)
      plan.json           the preflight plan (train.py --plan)
      report/             moe-report's PNGs and summary.txt

A folder MoETrainer saves (a Trainer checkpoint-N, a save_model() folder) holds a RunRecord of its MoE settings only
(the "moe" section and the resolved MoE layout) in the same file; such folders saved before that held them as
moe_config.json, which is still read.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint_folder import CheckpointFolder
from .config import SECTION_TYPES, ConfigError, MoEConfig, RunConfig
from .config_values import config_from_dict
from .moe_layout import MoELayout
from .writes import atomic_write, guarded_write

RECORD = "run_config.json"
METRICS = "metrics.jsonl"
TOKENIZER, BASE_MODEL, CHECKPOINTS, PLAN, REPORT = "tokenizer", "base_model", "checkpoints", "plan.json", "report"
LEGACY_MOE_SETTINGS = "moe_config.json"  # MoETrainer folders saved before they held a RunRecord


class RunRecordError(ValueError):
    """A run record that cannot be read; the message names the file and what to do."""


@dataclass
class Resolved:
    """What a run's settings resolved to (run_config.json's "resolved"); None where a record does not say (an
    MoETrainer folder's, or a folder written before the value was recorded)."""

    world_size: int | None = None
    deepspeed_config: dict | None = None
    moe_layout: MoELayout | None = None
    dense_parameters: int | None = None
    # the HF MoE folder every weight was read from (--model_name_or_path of an HF MoE model): its experts are that
    # model's, not upcycled; moe.expert_init is then only the rule that gave the layers their shape (copy or granular)
    imported_from: str | None = None
    moe_parameters_per_rank: int | None = None
    flops_per_token: float | None = None
    domains: list[str] | None = None
    train_blocks: int | None = None
    train_stream: dict | None = None
    validation_blocks: int | None = None
    data_cache: dict | None = None
    # conversational data: per split, its sequences, how many were too long or had nothing to train on, its blocks
    sequences: dict | None = None

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["moe_layout"] = self.moe_layout.to_dict() if self.moe_layout is not None else None
        return values


@dataclass
class RunRecord:
    """run_config.json: the settings (``sections`` of them are in the file; the others are their defaults) and what
    they resolved to."""

    settings: RunConfig
    resolved: Resolved = field(default_factory=Resolved)
    sections: tuple[str, ...] = tuple(SECTION_TYPES)
    written: dict[str, frozenset[str]] | None = None  # read from a file: the keys each section held there

    def recorded(self, section: str, key: str) -> bool:
        """Whether the record holds ``section.key`` itself (a record written before the setting existed, or of another
        kind, leaves it at its default)."""
        if self.written is None:
            return section in self.sections
        return key in self.written.get(section, frozenset())

    def to_dict(self) -> dict:
        settings = self.settings.to_dict()
        return {**{name: settings[name] for name in self.sections}, "resolved": self.resolved.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> RunRecord:
        """Raises ConfigError for unknown sections or keys."""
        if not isinstance(values, dict):
            raise ConfigError([f"it holds a JSON {type(values).__name__}, not an object"])
        resolved = values.get("resolved") or {}
        settings = config_from_dict({name: value for name, value in values.items() if name != "resolved"})
        known = {f.name for f in dataclasses.fields(Resolved)}
        kept = {name: value for name, value in resolved.items() if name in known}  # newer keys: not ours to read
        layout = kept.pop("moe_layout", None)
        kept["moe_layout"] = MoELayout.from_dict(layout, settings.moe) if layout and "blocks" in layout else None
        sections = tuple(name for name in SECTION_TYPES if name in values)
        written = {name: frozenset(values[name]) for name in sections if isinstance(values[name], dict)}
        return cls(settings, Resolved(**kept), sections, written)


class MetricsFile:
    """metrics.jsonl: rows appended one per line; read back (by a resumed run, the report, the payoff) with a last
    line that a kill cut short left out, and said so."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def rows(self) -> list[dict]:
        """Every complete row, in file order; [] without a file. A last line cut short is left out (with a note on
        stderr); a bad line elsewhere is a RunRecordError naming the file and line."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines):
                    print(f"note: {self.path}: its last line is cut short (the run was stopped while writing it); "
                          "it is left out", file=sys.stderr)
                    break
                raise RunRecordError(f"{self.path} line {number} is not a JSON row ({err}); remove or fix that "
                                     "line") from None
        return rows

    def append(self, row: dict) -> None:
        with guarded_write("the metrics file", self.path), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def keep_until(self, step: int) -> list[dict]:
        """On resume: keep the rows up to ``step`` (the later ones will be logged again), rewritten atomically;
        returns the rows kept."""
        kept = [row for row in self.rows() if row["step"] <= step]
        if self.path.is_file():
            atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in kept), "the metrics file")
        return kept

    def remove(self) -> None:
        with guarded_write("the metrics file", self.path):
            self.path.unlink(missing_ok=True)


class RunFolder:
    """One run's output folder (train.py's --output_dir), or a folder MoETrainer saved."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @classmethod
    def of_tag(cls, tag_dir: Path) -> RunFolder:
        """The run folder a checkpoint tag (OUT/checkpoints/global_stepN) belongs to."""
        return cls(Path(tag_dir).parent.parent)

    @classmethod
    def of_checkpoints(cls, checkpoints_dir: Path) -> RunFolder:
        """The run folder of a checkpoints/ folder."""
        return cls(Path(checkpoints_dir).parent)

    # -- paths -------------------------------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.path / RECORD

    @property
    def metrics(self) -> MetricsFile:
        return MetricsFile(self.path / METRICS)

    @property
    def checkpoints(self) -> CheckpointFolder:
        return CheckpointFolder(self.path / CHECKPOINTS)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER

    @property
    def base_model_dir(self) -> Path:
        return self.path / BASE_MODEL

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT

    def base_model_config(self) -> dict | None:
        """base_model/config.json as a dict (None when missing or unreadable); transformers reads the folder itself
        (AutoConfig.from_pretrained(folder.base_model_dir))."""
        try:
            return json.loads((self.base_model_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    # -- the record ----------------------------------------------------------------------------------------------

    def holds_run(self) -> bool:
        """Whether a run (or an MoETrainer save) already wrote its record here."""
        return self.record_path.exists()

    def holds_moe_settings(self) -> bool:
        """Whether the folder holds a record of MoE settings (an MoETrainer save, of any version)."""
        return self.record_path.is_file() or (self.path / LEGACY_MOE_SETTINGS).is_file()

    def record(self) -> RunRecord:
        """The folder's run record; a RunRecordError naming the file when it is missing or cannot be read."""
        path = self.record_path
        if not path.is_file() and (self.path / LEGACY_MOE_SETTINGS).is_file():
            return self._legacy_moe_settings()
        try:
            return RunRecord.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise RunRecordError(f"{path} not found: {self.path} holds no run (train.py writes it at the start of "
                                 "a run, MoETrainer beside the weights it saves)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunRecordError(f"{path} is not valid JSON ({err}); restore it from a copy, or start a new run in "
                                 "another --output_dir") from None
        except (ConfigError, TypeError, ValueError) as err:
            raise RunRecordError(f"{path} is not a run record this version reads ({err}); restore it, or start a "
                                 "new run in another --output_dir") from None

    def write_record(self, record: RunRecord) -> Path:
        """run_config.json, written atomically (a reader never sees half of it)."""
        with guarded_write("the run folder", self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.record_path, json.dumps(record.to_dict(), indent=2) + "\n", "the run record")
        return self.record_path

    def write_tokenizer(self, tokenizer) -> None:
        """tokenizer/: the tokenizer the run trains with (save_pretrained)."""
        with guarded_write("the tokenizer", self.tokenizer_dir):
            tokenizer.save_pretrained(self.tokenizer_dir)

    def write_base_model_config(self, config) -> None:
        """base_model/config.json: the dense model's HF config."""
        with guarded_write("the base model's config", self.base_model_dir):
            config.save_pretrained(self.base_model_dir)

    def write_moe_settings(self, moe: MoEConfig, layout: MoELayout, world_size: int | None = None) -> Path:
        """The record of an MoETrainer folder (or any folder holding a converted model's weights): the MoE settings
        and the layout only, which export reads."""
        return self.write_record(RunRecord(RunConfig(moe=moe), Resolved(world_size=world_size, moe_layout=layout),
                                           sections=("moe",)))

    def write_plan(self, plan: dict) -> Path:
        """plan.json: the preflight plan (train.py --plan)."""
        with guarded_write("the run folder", self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.plan_path, json.dumps(plan, indent=2) + "\n", "the plan")
        return self.plan_path

    def _legacy_moe_settings(self) -> RunRecord:
        path = self.path / LEGACY_MOE_SETTINGS
        try:
            values = json.loads(path.read_text())
            return RunRecord.from_dict({"moe": values["moe"], "resolved": {"moe_layout": values["moe_layout"]}})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ConfigError) as err:
            raise RunRecordError(f"{path} is not a valid MoE settings file ({err}); copy it from the run's other "
                                 "checkpoints, whose settings are the same") from None
