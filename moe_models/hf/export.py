"""DeepSpeed MoE checkpoint -> a native HF MoE model folder (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoe(Shared, -SWA),
FlexOlmo, HunYuan-MoE, ERNIE-4.5-MoE, Cohere2-MoE or GLM4-MoE: hf/configs.py).

    python -m moe_models.export --checkpoint OUT/checkpoints [--tag TAG] --output HF_DIR     # a train.py run
    python -m moe_models.export --checkpoint OUT[/checkpoint-N] --output HF_DIR             # an MoETrainer run

OUT is a train.py output folder: run_config.json (the MoE settings), base_model/config.json (the dense HF
config), tokenizer/ and checkpoints/; or a transformers Trainer output folder written by MoETrainer, whose
checkpoint-N folders hold moe_config.json, config.json, the tokenizer and the weights (hf/trainer_folder.py).
HF_DIR then loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``, no remote
code. docs/export.md says what maps to what, what is refused, and when the two models compute the same function.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from ..config import SECTION_TYPES, MoEConfig, RunConfig, config_from_dict
from ..models.architectures import architecture_of_config
from ..moe.layout import MoELayout
from ..training.checkpoint import CheckpointError, CheckpointFolder
from .adapters import ADAPTERS
from .configs import differences_in_training, hf_moe_config
from .trainer_folder import read_trainer_folder, trainer_folder, trainer_folder_weights
from .weights import deepspeed_weights


def export(checkpoint_dir: Path, output_dir: Path, tag: str | None = None, overwrite: bool = False) -> PretrainedConfig:
    """Write the checkpoint ``tag`` (default: the newest) as a native HF MoE model and the run's tokenizer to
    ``output_dir``; return the written model's config. ``checkpoint_dir``: a train.py run's checkpoints/ folder, or a
    folder MoETrainer saved (or its output_dir). Raises ValueError (NotRepresentable among them) before anything is
    written when the model has no exact native class or the inputs are incomplete."""
    from_trainer = trainer_folder(checkpoint_dir)
    moe, dense, layout = read_trainer_folder(from_trainer) if from_trainer else read_run_settings(checkpoint_dir.parent)
    config = hf_moe_config(dense, moe, layout)
    if (output_dir / "config.json").exists() and not overwrite:
        raise ValueError(f"{output_dir} already holds a model; pass --overwrite or choose another --output")
    if from_trainer:
        module, expert_weights = trainer_folder_weights(from_trainer, tag, dense, moe, layout)
        tokenizer_dir = from_trainer
    else:
        module, expert_weights = run_weights(checkpoint_dir, tag, dense, layout)
        tokenizer_dir = checkpoint_dir.parent / "tokenizer"
    state = ADAPTERS[config.model_type].to_hf(module, architecture_of_config(dense), layout, expert_weights)

    dtype = next(iter(state.values())).dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for tied, source in model.all_tied_weights_keys.items():  # save_pretrained writes one name of tied weights
        if tied not in state and source in state:
            state[tied] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied parameters one by one
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(output_dir)
    return model.config


def read_run(run_dir: Path) -> tuple[RunConfig, PretrainedConfig, MoELayout]:
    """The run's settings and MoE layout (run_config.json) and its dense model's HF config (base_model/), all
    written by train.py."""
    needed = [run_dir / "run_config.json", run_dir / "base_model" / "config.json", run_dir / "tokenizer"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: --checkpoint must be the checkpoints/ folder inside a "
                         "train.py output folder, which holds them, or a folder MoETrainer saved (with "
                         "moe_config.json)")
    values = json.loads((run_dir / "run_config.json").read_text())
    run = config_from_dict({section: values.get(section, {}) for section in SECTION_TYPES})
    dense = AutoConfig.from_pretrained(run_dir / "base_model")
    saved = values.get("resolved", {}).get("moe_layout")
    # runs written before the layout was saved resolve it from their settings, as their train.py did
    layout = MoELayout.from_dict(saved) if saved else MoELayout.resolve(run.moe, dense.num_hidden_layers)
    return run, dense, layout


def read_run_settings(run_dir: Path) -> tuple[MoEConfig, PretrainedConfig, MoELayout]:
    run, dense, layout = read_run(run_dir)
    return run.moe, dense, layout


def run_weights(checkpoint_dir: Path, tag: str | None, dense: PretrainedConfig, layout: MoELayout) -> tuple:
    """The weights of a train.py run's checkpoint ``tag`` (default: the one ``latest`` names), which must be
    complete."""
    folder = CheckpointFolder(checkpoint_dir)
    tag_dir = folder.path / tag if tag else folder.latest()
    if tag_dir is None:
        raise CheckpointError(f"{checkpoint_dir} has no 'latest' file naming the newest checkpoint; pass --tag "
                              "(a global_step* folder in it)")
    if tag_dir.is_dir():
        folder.check_complete(tag_dir)
    return deepspeed_weights(folder.path, tag_dir, architecture_of_config(dense), layout)


def moe_settings(checkpoint_dir: Path) -> MoEConfig:
    """The MoE settings of what ``--checkpoint`` names (for the notes after an export)."""
    from_trainer = trainer_folder(checkpoint_dir)
    return read_trainer_folder(from_trainer)[0] if from_trainer else read_run(checkpoint_dir.parent)[0].moe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_models.export", allow_abbrev=False,
        description="Export a train.py DeepSpeed MoE checkpoint as a native Hugging Face MoE model (Mixtral for "
                    "Llama/Mistral, Qwen2-MoE / Qwen3-MoE for Qwen2/Qwen3, and more: docs/export.md) with its "
                    "tokenizer.")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="the checkpoints/ folder of a train.py output folder (OUT/checkpoints); or a folder "
                        "MoETrainer saved (a Trainer checkpoint-N, a save_model() folder) or its output_dir (the "
                        "newest checkpoint-N)")
    parser.add_argument("--tag", default=None, help="which DeepSpeed checkpoint, e.g. global_step300 (default: the "
                        "newest, named in the `latest` file)")
    parser.add_argument("--output", required=True, type=Path, help="folder to write the HF model and tokenizer to")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config = export(args.checkpoint, args.output, args.tag, args.overwrite)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    for note in differences_in_training(moe_settings(args.checkpoint)):
        print(f"note: {note}")
    print(f"Wrote {config.architectures[0]} ({config.model_type}) and the tokenizer to {args.output}")


if __name__ == "__main__":
    main()
