"""Whether the checkpoint --resume_from_checkpoint names can be used, checked before a process group, a model or
data exist and before anything in the output folder is written: it must be complete, its files whole, its run
readable and trained with the same model, experts (count and width), null experts, shared experts and top_k (what its
run_config.json recorded), with the same routing rule unless --allow_routing_change, at the same world size, ep_size
and moe_impl unless --reset_optimizer, with a data position of the same kind (a stream's or blocks') and before
--max_steps. Then the routing settings a resumed run inherits from its record (resumed_settings)."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

from ..models.discovery import counts_experts
from ..models.source import DEFAULT_PRESET, local_config
from ..run.checkpoint_folder import CheckpointError, CheckpointFolder
from ..run.config import ROUTING_FLAGS, ConfigError, RunConfig
from ..run.config_values import flag_text
from ..run.folder import RunFolder, RunRecordError
from ..run.moe_layout import NO_MOE_LAYERS, MoELayout
from .checkpoint import optimizer_layout_problem

class FinishedRun(Exception):
    """The checkpoint to resume is at --max_steps: there is nothing to train (not an error)."""


# The config keys that decide the shapes of a model's weights (Llama-style names, then GPT-2's).
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner",
              "num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads")


def resumed_tag(cfg: RunConfig) -> Path | None:
    """The tag folder --resume_from_checkpoint resolves to (None: no resume, or "latest" before the first save)."""
    spec = cfg.train.resume_from_checkpoint
    if not spec or (spec != "latest" and not Path(spec).is_dir()):  # a missing path is a settings problem
        return None
    return RunFolder(cfg.train.output_dir).checkpoints.resolve(spec)


def check_resumable(cfg: RunConfig, world_size: int) -> None:
    """Raise a CheckpointError naming the checkpoint (or its file) and the fix when it cannot be resumed at
    ``world_size`` ranks (--max_steps is check_not_finished's, called after every other check)."""
    tag_dir = resumed_tag(cfg)
    if tag_dir is None:
        return
    folder = CheckpointFolder(tag_dir.parent)
    meta = folder.check_complete(tag_dir)
    for path in folder.torch_files(tag_dir):
        damage = _damage(path)
        if damage:
            raise CheckpointError(f"checkpoint file {path} is {damage}; {folder.previous_good(tag_dir)}")
    problem = _other_data_kind(tag_dir, cfg.data.streaming)
    if problem:
        raise CheckpointError(problem)
    problem = _other_run(tag_dir, cfg) or optimizer_layout_problem(tag_dir, meta, world_size, cfg.moe.ep_size,
                                                                     cfg.moe.moe_impl, cfg.train.reset_optimizer)
    if problem:
        raise CheckpointError(problem)


def check_not_finished(cfg: RunConfig) -> None:
    """A resume at or past --max_steps trains nothing: past it is refused (a CheckpointError), at it is FinishedRun."""
    tag_dir = resumed_tag(cfg)
    if tag_dir is None:
        return
    step, max_steps = CheckpointFolder.step_of(tag_dir), cfg.train.max_steps
    if step > max_steps:
        raise CheckpointError(f"{tag_dir} is at step {step}, past --max_steps {max_steps}: resuming would train "
                              f"nothing; pass a --max_steps above {step} to train further")
    if step == max_steps:
        raise FinishedRun(f"Nothing to train: {tag_dir} is at step {step}, which is --max_steps; the run is finished "
                          f"(pass a --max_steps above {step} to train further)")


def resumed_settings(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """On resume: ``cfg`` with the routing settings it did not give taken from the resumed run's record (a run
    continues as it was trained, also when a default changed since), and those flags as text ("--drop_tokens
    true"); given ones that differ were refused by check_resumable unless --allow_routing_change."""
    record = _resumed_record(cfg)
    if record is None:
        return cfg, []
    taken = {name: getattr(record.settings.moe, name) for name in ROUTING_FLAGS
             if not cfg.was_given(name) and record.recorded("moe", name)
             and getattr(record.settings.moe, name) != getattr(cfg.moe, name)}
    if not taken:
        return cfg, []
    return (dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **taken)),
            [f"--{name} {flag_text(value)}" for name, value in taken.items()])


def resumed_record_path(cfg: RunConfig) -> Path | None:
    """The run_config.json of the run --resume_from_checkpoint continues (None: no resume, or no record)."""
    tag_dir = resumed_tag(cfg)
    if tag_dir is None or not RunFolder.of_tag(tag_dir).holds_run():
        return None
    return RunFolder.of_tag(tag_dir).record_path


def _resumed_record(cfg: RunConfig):
    if resumed_record_path(cfg) is None:
        return None
    try:
        return RunFolder.of_tag(resumed_tag(cfg)).record()
    except RunRecordError:
        return None


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
    except RunRecordError as err:  # its settings cannot be checked: resuming it blind could change training
        return str(err)
    saved = run.base_model_config()
    fix = (f"resume with the settings it was trained with ({run.record_path}), or start a new run "
           "without --resume_from_checkpoint")
    current, _ = local_config(cfg.model)
    if current is not None and counts_experts(current) and saved is not None and not counts_experts(saved):
        source = record.settings.model
        was = record.resolved.imported_from or source.model_name_or_path or source.model_config or DEFAULT_PRESET
        found = (f"{tag_dir} holds a {saved.get('model_type')} model with our MoE layers (trained from {was!r}), and "
                 f"this run continues {cfg.model.model_name_or_path} in place, in its own class, which that checkpoint "
                 "does not fit")
        if record.resolved.imported_from:  # an MoE folder imported through its dense family, as earlier versions did
            return (f"{found}: export the checkpoint (python -m moe_models.export --checkpoint {tag_dir.parent} --tag "
                    f"{tag_dir.name} --output HF_DIR) and continue the export with --model_name_or_path HF_DIR")
        return f"{found}: {fix}"
    if current is None or counts_experts(current):
        return None  # a hub id, or an MoE in place: its settings come from the checkpoint
    if saved is not None:
        differing = [key for key in SHAPE_KEYS if key in saved and key in current and saved[key] != current[key]]
        if differing:
            source = record.settings.model
            was = source.model_name_or_path or source.model_config or DEFAULT_PRESET
            return (f"{tag_dir} holds another model than this run builds ("
                    + ", ".join(f"{key} {saved[key]} there, {current[key]} here" for key in differing)
                    + f"); it was trained from {was!r}: {fix}")
    moe = record.settings.moe
    for name in ("num_experts", "num_null_experts", "null_expert_output", "top_k", "num_shared_experts",
                 "shared_expert_gate"):
        if getattr(moe, name) != getattr(cfg.moe, name):
            return (f"{tag_dir} was trained with --{name} {flag_text(getattr(moe, name))}, this run has --{name} "
                    f"{flag_text(getattr(cfg.moe, name))}; pass --{name} {flag_text(getattr(moe, name))} to "
                    "continue it, or start a new run without --resume_from_checkpoint")
    problem = _routing_change(tag_dir, record, cfg)
    if problem:
        return problem
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


def _routing_change(tag_dir: Path, record, cfg: RunConfig) -> str | None:
    """A routing flag given with another value than the run recorded, without --allow_routing_change."""
    if cfg.train.allow_routing_change:
        return None
    for name in ROUTING_FLAGS:
        was, now = getattr(record.settings.moe, name), getattr(cfg.moe, name)
        if cfg.was_given(name) and record.recorded("moe", name) and was != now:
            return (f"{tag_dir} was trained with --{name} {flag_text(was)}, this run has --{name} {flag_text(now)}: "
                    f"that changes how tokens are routed from here on; pass --{name} {flag_text(was)} (or leave it "
                    "out) to continue it as it was trained, or --allow_routing_change to change it")
    return None


def _expert_width_text(granularity: int) -> str:
    return ("the dense FFN's width" if granularity == 1
            else f"1/{granularity} of the dense FFN's width (--expert_init granular --granularity {granularity})")

