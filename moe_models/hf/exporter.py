"""DeepSpeed MoE checkpoint -> a native HF MoE model folder (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoe(Shared, -SWA),
FlexOlmo, HunYuan-MoE, ERNIE-4.5-MoE, Cohere2-MoE or GLM4-MoE: hf/configs.py).

    export(Path("OUT/checkpoints"), Path("HF_DIR"))        # a train.py run (the command: moe_models/export.py)
    export(Path("OUT/checkpoint-N"), Path("HF_DIR"))       # an MoETrainer run, or its output_dir OUT

OUT is a train.py output folder (run/folder.py: the run record with the MoE settings and layout, base_model/ with
the dense HF config, tokenizer/ and checkpoints/); or a transformers Trainer output folder written by MoETrainer,
whose checkpoint-N folders hold the MoE settings' record, config.json, the tokenizer and the weights
(hf/trainer_folder.py). A run that continued an HF MoE in place (hf/in_place_run.py) is written back as its own
class (hf/in_place_export.py).
HF_DIR then loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``, no remote
code. docs/export.md says what maps to what, what is refused, and when the two models compute the same function.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from ..models.architectures import architecture_of_config
from ..models.discovery import checkpoint_expert_count
from ..run.checkpoint_folder import CheckpointError, CheckpointFolder
from ..run.config import MoEConfig, RunConfig
from ..run.folder import RunFolder
from ..run.moe_layout import MoELayout
from ..run.writes import guarded_write, writable_problem
from .adapters import ADAPTERS
from .configs import hf_moe_config
from .in_place_export import in_place_state
from .trainer_folder import read_trainer_folder, trainer_folder, trainer_folder_weights
from .weights import deepspeed_weights


def export(checkpoint_dir: Path, output_dir: Path, tag: str | None = None, overwrite: bool = False) -> PretrainedConfig:
    """Write the checkpoint ``tag`` (default: the newest) as a native HF MoE model (for a run continued in place,
    its own class) and the run's tokenizer to ``output_dir``; return the written model's config. ``checkpoint_dir``:
    a train.py run's checkpoints/ folder, or a folder MoETrainer saved (or its output_dir). Raises ValueError
    (NotRepresentable among them) before anything is written when the model has no exact native class or the inputs
    are incomplete."""
    from_trainer = trainer_folder(checkpoint_dir)
    moe, dense, layout = (read_trainer_folder(from_trainer) if from_trainer
                          else read_run_settings(RunFolder.of_checkpoints(checkpoint_dir).path))
    if checkpoint_expert_count(dense.to_dict()):  # continued in place: the run's model is an MoE class itself
        if from_trainer:
            raise ValueError(f"{from_trainer} holds a {dense.model_type} model continued in place, which export reads "
                             "from a train.py run only: pass that run's checkpoints/ folder")
        check_target(output_dir, overwrite)
        run = RunFolder.of_checkpoints(checkpoint_dir)
        config, state = in_place_state(Path(checkpoint_dir), run_tag(checkpoint_dir, tag), dense,
                                       run.record().resolved.imported_from)
        return save_model(config, state, run.tokenizer_dir, output_dir)
    config = hf_moe_config(dense, moe, layout)
    check_target(output_dir, overwrite)
    if from_trainer:
        module, expert_weights = trainer_folder_weights(from_trainer, tag, dense, moe, layout)
        tokenizer_dir = from_trainer
    else:
        module, expert_weights = run_weights(checkpoint_dir, tag, dense, layout)
        tokenizer_dir = RunFolder.of_checkpoints(checkpoint_dir).tokenizer_dir
    state = ADAPTERS[config.model_type].to_hf(module, architecture_of_config(dense), layout, expert_weights)
    return save_model(config, state, tokenizer_dir, output_dir)


def save_model(config: PretrainedConfig, state: dict, tokenizer_dir: Path, output_dir: Path) -> PretrainedConfig:
    """The model of ``config`` holding ``state`` (every weight, in the class's names) and the tokenizer of
    ``tokenizer_dir``, as ``save_pretrained`` writes them, into ``output_dir`` (in place, whole or not at all)."""
    dtype = next(iter(state.values())).dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for tied, source in model.all_tied_weights_keys.items():  # save_pretrained writes one name of tied weights
        if tied not in state and source in state:
            state[tied] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied parameters one by one
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    written_in_place(output_dir, lambda folder: (model.save_pretrained(folder), tokenizer.save_pretrained(folder)))
    return model.config


def check_target(output_dir: Path, overwrite: bool) -> None:
    """The export's folder must be new, empty, or (with --overwrite) an earlier export, and its parent writable: a
    folder of the user's own files is never written into."""
    if output_dir.is_file():
        raise ValueError(f"--output {output_dir} is a file; give a folder to export into")
    held = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    if held and not (output_dir / "config.json").is_file():
        raise ValueError(f"--output {output_dir} holds other files ({', '.join(held[:3])}"
                         + (", ..." if len(held) > 3 else "") + "), not an exported model: choose a new or empty "
                         "folder")
    if held and not overwrite:
        raise ValueError(f"{output_dir} already holds a model; pass --overwrite or choose another --output")
    # the export is written beside the target, then renamed into place: the parent folder must take new files
    problem = writable_problem(output_dir if not output_dir.exists() else output_dir.resolve().parent, "--output")
    if problem:
        raise ValueError(problem)


def written_in_place(output_dir: Path, write) -> None:
    """``write(folder)`` into a new folder beside ``output_dir``, which then takes its place: a failed or interrupted
    export leaves ``output_dir`` as it was (an earlier export stays whole). Missing parent folders are made, as
    train.py makes its --output_dir."""
    output_dir = output_dir.resolve()
    with guarded_write("the export", output_dir):
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.export-", dir=output_dir.parent))
    try:
        with guarded_write("the export", output_dir):
            write(stage)
            if output_dir.is_dir() and any(output_dir.iterdir()):  # an earlier export, replaced (--overwrite)
                old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
                os.replace(output_dir, old)
                os.replace(stage, output_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, output_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_run(run_dir: Path) -> tuple[RunConfig, PretrainedConfig, MoELayout]:
    """The run's settings and MoE layout (its record) and its dense model's HF config (base_model/), all written by
    train.py."""
    run = RunFolder(run_dir)
    needed = [run.record_path, run.base_model_dir / "config.json", run.tokenizer_dir]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: --checkpoint must be the checkpoints/ folder inside a "
                         "train.py output folder, which holds them, or a folder MoETrainer saved (with its MoE "
                         "settings' record)")
    record = run.record()
    dense = AutoConfig.from_pretrained(run.base_model_dir)
    # runs written before the layout was saved resolve it from their settings, as their train.py did
    layout = record.resolved.moe_layout or MoELayout.resolve(record.settings.moe, dense.num_hidden_layers)
    return record.settings, dense, layout


def read_run_settings(run_dir: Path) -> tuple[MoEConfig, PretrainedConfig, MoELayout]:
    run, dense, layout = read_run(run_dir)
    return run.moe, dense, layout


def run_weights(checkpoint_dir: Path, tag: str | None, dense: PretrainedConfig, layout: MoELayout) -> tuple:
    """The weights of a train.py run's checkpoint ``tag`` (default: the one ``latest`` names), which must be
    complete."""
    return deepspeed_weights(CheckpointFolder(checkpoint_dir).path, run_tag(checkpoint_dir, tag),
                             architecture_of_config(dense), layout)


def run_tag(checkpoint_dir: Path, tag: str | None) -> Path:
    """The folder of a train.py run's checkpoint ``tag`` (default: the one ``latest`` names), complete when it
    exists."""
    folder = CheckpointFolder(checkpoint_dir)
    tag_dir = folder.path / tag if tag else folder.latest()
    if tag_dir is None:
        raise CheckpointError(f"{checkpoint_dir} has no 'latest' file naming the newest checkpoint; pass --tag "
                              "(a global_step* folder in it)")
    if tag_dir.is_dir():
        folder.check_complete(tag_dir)
    return tag_dir


def moe_settings(checkpoint_dir: Path) -> MoEConfig:
    """The MoE settings of what ``--checkpoint`` names (for the notes after an export)."""
    from_trainer = trainer_folder(checkpoint_dir)
    return (read_trainer_folder(from_trainer)[0] if from_trainer
            else read_run(RunFolder.of_checkpoints(checkpoint_dir).path)[0].moe)
