"""DeepSpeed MoE checkpoint -> a native HF MoE model folder (Mixtral, Qwen2-MoE, Qwen3-MoE or GraniteMoeShared).

    python -m moe_models.export --checkpoint OUT/checkpoints [--tag TAG] --output HF_DIR

OUT is a train.py output folder: run_config.json (the MoE settings), base_model/config.json (the dense HF
config), tokenizer/ and checkpoints/. HF_DIR then loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``, no remote code. docs/export.md says what maps to what, what is refused, and
when the two models compute the same function.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import init_empty_weights
from deepspeed.checkpoint.utils import get_model_ckpt_name_for_rank
from deepspeed.runtime.engine import DeepSpeedEngine
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from ..config import SECTION_TYPES, RunConfig, config_from_dict
from ..models.architectures import ARCHITECTURES, SWIGLU
from ..moe.layer import expert_weight_key
from ..moe.layout import MoELayout
from ..training.checkpoint import CheckpointError, CheckpointFolder
from .adapters import EXPORT_ADAPTERS
from .configs import differences_in_training, hf_moe_config


def export(checkpoint_dir: Path, output_dir: Path, tag: str | None = None, overwrite: bool = False) -> PretrainedConfig:
    """Write the checkpoint ``tag`` (default: the newest) as a native HF MoE model and the run's tokenizer to
    ``output_dir``; return the written model's config. Raises ValueError (NotRepresentable among them) before
    anything is written when the model has no exact native class or the inputs are incomplete."""
    run_dir = checkpoint_dir.parent
    run, dense, layout = read_run(run_dir)
    config = hf_moe_config(dense, run.moe, layout)
    if (output_dir / "config.json").exists() and not overwrite:
        raise ValueError(f"{output_dir} already holds a model; pass --overwrite or choose another --output")
    folder = CheckpointFolder(checkpoint_dir)
    tag_dir = folder.path / tag if tag else folder.latest()
    if tag_dir is None:
        raise CheckpointError(f"{checkpoint_dir} has no 'latest' file naming the newest checkpoint; pass --tag "
                              "(a global_step* folder in it)")
    state = hf_state_dict(folder, tag_dir, dense, layout, config)

    dtype = next(iter(state.values())).dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied parameters one by one
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(run_dir / "tokenizer").save_pretrained(output_dir)
    return model.config


def read_run(run_dir: Path) -> tuple[RunConfig, PretrainedConfig, MoELayout]:
    """The run's settings and MoE layout (run_config.json) and its dense model's HF config (base_model/), all
    written by train.py."""
    needed = [run_dir / "run_config.json", run_dir / "base_model" / "config.json", run_dir / "tokenizer"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: --checkpoint must be the checkpoints/ folder inside a "
                         "train.py output folder, which holds them")
    values = json.loads((run_dir / "run_config.json").read_text())
    run = config_from_dict({section: values.get(section, {}) for section in SECTION_TYPES})
    dense = AutoConfig.from_pretrained(run_dir / "base_model")
    saved = values.get("resolved", {}).get("moe_layout")
    # runs written before the layout was saved resolve it from their settings, as their train.py did
    layout = MoELayout.from_dict(saved) if saved else MoELayout.resolve(run.moe, dense.num_hidden_layers)
    return run, dense, layout


def hf_state_dict(folder: CheckpointFolder, tag_dir: Path, dense: PretrainedConfig, layout: MoELayout,
                  config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under the HF MoE class's names (its adapter, hf/adapters.py, names them): the
    non-expert weights and routers from the model file, each expert from its own DeepSpeed file (one per MoE layer
    and global expert)."""
    if tag_dir.is_dir():
        folder.check_complete(tag_dir)
    module_file = Path(get_model_ckpt_name_for_rank(str(tag_dir), "00"))
    if not module_file.is_file():
        raise ValueError(f"{module_file} not found: {tag_dir.name!r} is not a complete DeepSpeed checkpoint in "
                         f"{folder.path}")
    module = torch.load(module_file, map_location="cpu", weights_only=True, mmap=True)["module"]
    arch = ARCHITECTURES[dense.model_type]

    def expert_weights(moe_layer_id: int, expert_id: int) -> tuple[torch.Tensor, ...]:
        """(gate, up, down) weights of one global expert, from its own DeepSpeed checkpoint file."""
        path = Path(DeepSpeedEngine._get_expert_ckpt_name(str(folder.path), moe_layer_id, expert_id, tag_dir.name))
        if not path.is_file():
            raise ValueError(f"{path} not found: checkpoint {tag_dir.name!r} lacks expert {expert_id} of MoE layer "
                             f"{moe_layer_id} (an interrupted save, or run_config.json from another run)")
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ffn = arch.ffn_path(layout.blocks[moe_layer_id])
        return tuple(weights[expert_weight_key(ffn, expert_id, projection)] for projection in SWIGLU)

    return EXPORT_ADAPTERS[config.model_type].to_hf(module, arch, layout, expert_weights)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_models.export", allow_abbrev=False,
        description="Export a train.py DeepSpeed MoE checkpoint as a native Hugging Face MoE model (Mixtral for "
                    "Llama/Mistral, Qwen2-MoE / Qwen3-MoE for Qwen2/Qwen3) with its tokenizer. See docs/export.md.")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="the checkpoints/ folder of a train.py output folder (OUT/checkpoints)")
    parser.add_argument("--tag", default=None, help="which checkpoint, e.g. global_step300 (default: the newest, "
                        "named in checkpoints/latest)")
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
    run, _, _ = read_run(args.checkpoint.parent)
    for note in differences_in_training(run.moe):
        print(f"note: {note}")
    print(f"Wrote {config.architectures[0]} ({config.model_type}) and the tokenizer to {args.output}")


if __name__ == "__main__":
    main()
