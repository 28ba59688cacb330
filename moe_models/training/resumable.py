"""Whether the checkpoint --resume_from_checkpoint names can be used, checked before a process group, a model or
data exist and before anything in the output folder is written: it must be complete, its files whole, and its run
must have trained the same model with the same experts (count and width), shared experts and top_k (what its
run_config.json recorded), and its data position must be of the same kind (a stream's or blocks')."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..models.architectures import IMPORTABLE_MOE_MODEL_TYPES
from ..models.source import DEFAULT_PRESET, local_config
from ..run.checkpoint_folder import CheckpointError, CheckpointFolder
from ..run.config import ConfigError, RunConfig
from ..run.folder import RunFolder, RunRecordError
from ..run.moe_layout import NO_MOE_LAYERS, MoELayout

# The config keys that decide the shapes of a model's weights (Llama-style names, then GPT-2's).
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner",
              "num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads")


def check_resumable(cfg: RunConfig) -> None:
    """Raise a CheckpointError naming the checkpoint (or its file) and the fix when it cannot be resumed."""
    spec = cfg.train.resume_from_checkpoint
    if not spec or (spec != "latest" and not Path(spec).is_dir()):  # a missing path is a settings problem
        return
    tag_dir = RunFolder(cfg.train.output_dir).checkpoints.resolve(spec)
    if tag_dir is None:  # "latest" before the first save: a fresh start
        return
    folder = CheckpointFolder(tag_dir.parent)
    folder.check_complete(tag_dir)
    for path in folder.torch_files(tag_dir):
        damage = _damage(path)
        if damage:
            raise CheckpointError(f"checkpoint file {path} is {damage}; {folder.previous_good(tag_dir)}")
    problem = _other_data_kind(tag_dir, cfg.data.streaming)
    if problem:
        raise CheckpointError(problem)
    problem = _other_run(tag_dir, cfg)
    if problem:
        raise CheckpointError(problem)


def check_upcycle_source(cfg: RunConfig) -> None:
    """Raise a CheckpointError when --upcycle_from_checkpoint names no complete checkpoint of a dense run (--moe_layers
    none) before this run's last step, or when this run itself has no MoE layer to upcycle into."""
    spec = cfg.train.upcycle_from_checkpoint
    if not spec or not Path(spec).is_dir():  # a missing path is a settings problem
        return
    if cfg.moe.moe_layers == NO_MOE_LAYERS:
        raise CheckpointError(f"--upcycle_from_checkpoint {spec} upcycles a dense run into MoE layers, but this run has "
                              f"--moe_layers {NO_MOE_LAYERS}: choose the MoE layers (e.g. --moe_layers all)")
    tag_dir = RunFolder(cfg.train.output_dir).checkpoints.resolve(spec)
    if tag_dir is None:
        raise CheckpointError(f"--upcycle_from_checkpoint {spec} holds no complete checkpoint yet")
    CheckpointFolder(tag_dir.parent).check_complete(tag_dir)
    dense_run = RunFolder.of_tag(tag_dir)
    try:
        layout = dense_run.record().resolved.moe_layout
    except RunRecordError:
        layout = None
    blocks = list(layout.blocks) if layout is not None else None
    if blocks != []:
        raise CheckpointError(f"--upcycle_from_checkpoint {tag_dir}: "
                              + (f"its run has MoE layers in blocks {blocks}; upcycling takes a dense run's checkpoint "
                                 f"(trained with --moe_layers {NO_MOE_LAYERS}); to continue an MoE run use "
                                 "--resume_from_checkpoint" if blocks else
                                 f"{dense_run.record_path} is missing or unreadable: it must be a checkpoint of a "
                                 f"train.py run with --moe_layers {NO_MOE_LAYERS}"))
    step = CheckpointFolder.step_of(tag_dir)
    if step >= cfg.train.max_steps:
        raise CheckpointError(f"--upcycle_from_checkpoint {tag_dir} is at step {step}, and this run ends at "
                              f"--max_steps {cfg.train.max_steps}: nothing would be trained; raise --max_steps or "
                              "upcycle an earlier checkpoint")


def _damage(path: Path) -> str | None:
    """Why a torch file cannot be read, found without reading it: empty, or a zip archive cut short."""
    if path.stat().st_size == 0:
        return "empty (0 bytes)"
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # not torch's zip format (an old-style file): loading will tell
            return None
    try:
        zipfile.ZipFile(path).close()
    except zipfile.BadZipFile:
        return "truncated or corrupt (its zip directory is missing)"
    return None


def _other_data_kind(tag_dir: Path, streaming: bool) -> str | None:
    """A stream's position (--streaming) and a position in packed blocks do not translate into each other."""
    path = CheckpointFolder.data_position_file(tag_dir, 0)
    try:
        streamed = path.is_file() and "text" in json.loads(path.read_text())  # checkpoints without it: blocks
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # loading will tell
    if streamed == streaming:
        return None
    was, now = ("with", "without") if streamed else ("without", "with")
    return (f"{tag_dir} was saved by a run {was} --streaming, this run is {now} it: a position in a stream and one "
            f"in packed blocks do not translate into each other; pass --streaming {str(streamed).lower()} to continue "
            "it, or start a new run without --resume_from_checkpoint")


def _other_run(tag_dir: Path, cfg: RunConfig) -> str | None:
    """How the checkpoint's run differs from this one in the model or the MoE shape, with the fix (None when its
    folder holds no readable record: loading will tell)."""
    run = RunFolder.of_tag(tag_dir)
    if not run.holds_run():
        return None
    try:
        record = run.record()
    except RunRecordError:
        return None
    saved = run.base_model_config()
    fix = (f"resume with the settings it was trained with ({run.record_path}), or start a new run "
           "without --resume_from_checkpoint")
    current, _ = local_config(cfg.model)
    if current is None or current.get("model_type") in IMPORTABLE_MOE_MODEL_TYPES:  # a hub id, or an import that
        return None                                                   # takes its MoE settings from the checkpoint
    if saved is not None:
        differing = [key for key in SHAPE_KEYS if key in saved and key in current and saved[key] != current[key]]
        if differing:
            source = record.settings.model
            was = source.model_name_or_path or source.model_config or DEFAULT_PRESET
            return (f"{tag_dir} holds another model than this run builds ("
                    + ", ".join(f"{key} {saved[key]} there, {current[key]} here" for key in differing)
                    + f"); it was trained from {was!r}: {fix}")
    moe = record.settings.moe
    for name in ("num_experts", "top_k", "num_shared_experts", "shared_expert_gate"):
        if getattr(moe, name) != getattr(cfg.moe, name):
            return (f"{tag_dir} was trained with --{name} {_flag_text(getattr(moe, name))}, this run has --{name} "
                    f"{_flag_text(getattr(cfg.moe, name))}; pass --{name} {_flag_text(getattr(moe, name))} to "
                    "continue it, or start a new run without --resume_from_checkpoint")
    layers = current.get("num_hidden_layers") or current.get("n_layer")
    if not layers:
        return None
    try:
        wanted = MoELayout.resolve(cfg.moe, layers)
        was = record.resolved.moe_layout or MoELayout.resolve(moe, layers)  # runs from before it was recorded
    except ConfigError:
        return None  # the settings checks report a malformed --moe_layers
    if was.granularity != wanted.granularity:
        return (f"{tag_dir} holds experts of {_expert_width_text(was.granularity)}, this run builds experts of "
                f"{_expert_width_text(wanted.granularity)}; pass "
                + (f"--expert_init granular --granularity {was.granularity}" if was.granularity > 1
                   else "an --expert_init other than granular")
                + " to continue it, or start a new run without --resume_from_checkpoint")
    if record.resolved.moe_layout is not None and wanted.blocks != was.blocks:
        blocks, now = list(was.blocks), list(wanted.blocks)
        return (f"{tag_dir} has MoE layers in blocks {blocks}, --moe_layers {cfg.moe.moe_layers} gives {now}; "
                f"pass --moe_layers {','.join(map(str, blocks))} to continue it, or start a new run without "
                "--resume_from_checkpoint")
    return None


def _expert_width_text(granularity: int) -> str:
    return ("the dense FFN's width" if granularity == 1
            else f"1/{granularity} of the dense FFN's width (--expert_init granular --granularity {granularity})")


def _flag_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
