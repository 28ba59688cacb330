"""DeepSpeed MoE checkpoint -> a native HF MoE model folder (Mixtral, Qwen2-MoE or Qwen3-MoE).

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

from .architectures import ARCHITECTURES
from .checkpoint import COMPLETE
from .config import SECTION_TYPES, RunConfig, config_from_dict, resolve_moe_layers
from .hf_moe import EXPERT_PROJECTIONS, differences_in_training, empty_shared_expert, fuse_experts, hf_moe_config
from .layer import EXPERTS, ROUTER_WEIGHT


def export(checkpoint_dir: Path, output_dir: Path, tag: str | None = None, overwrite: bool = False) -> PretrainedConfig:
    """Write the checkpoint ``tag`` (default: the newest) as a native HF MoE model and the run's tokenizer to
    ``output_dir``; return the written model's config. Raises ValueError (NotRepresentable among them) before
    anything is written when the model has no exact native class or the inputs are incomplete."""
    run_dir = checkpoint_dir.parent
    run, dense = read_run(run_dir)
    config = hf_moe_config(dense, run.moe)
    if (output_dir / "config.json").exists() and not overwrite:
        raise ValueError(f"{output_dir} already holds a model; pass --overwrite or choose another --output")
    tag = tag or latest_tag(checkpoint_dir)
    state = hf_state_dict(checkpoint_dir, tag, dense, run, config)

    dtype = next(iter(state.values())).dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied parameters one by one
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(run_dir / "tokenizer").save_pretrained(output_dir)
    return model.config


def read_run(run_dir: Path) -> tuple[RunConfig, PretrainedConfig]:
    """The run's settings (run_config.json) and its dense model's HF config (base_model/), both written by train.py."""
    needed = [run_dir / "run_config.json", run_dir / "base_model" / "config.json", run_dir / "tokenizer"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: --checkpoint must be the checkpoints/ folder inside a "
                         "train.py output folder, which holds them")
    values = json.loads((run_dir / "run_config.json").read_text())
    run = config_from_dict({section: values.get(section, {}) for section in SECTION_TYPES})
    return run, AutoConfig.from_pretrained(run_dir / "base_model")


def latest_tag(checkpoint_dir: Path) -> str:
    latest = checkpoint_dir / "latest"  # names the newest complete tag (moe_models.checkpoint.save)
    if not latest.is_file():
        raise ValueError(f"{checkpoint_dir} has no 'latest' file naming the newest checkpoint; pass --tag "
                         "(a global_step* folder in it)")
    return latest.read_text().strip()


def hf_state_dict(checkpoint_dir: Path, tag: str, dense: PretrainedConfig, run: RunConfig,
                  config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under the HF MoE class's names.

    Non-expert weights keep their names (the MoE classes keep blocks, attention, norms and dense FFNs where the dense
    family has them); each router becomes ``<ffn>.gate.weight``; the experts of each MoE block, one DeepSpeed file per
    (MoE layer, global expert), are fused into ``<ffn>.experts.gate_up_proj`` and ``<ffn>.experts.down_proj``.
    """
    tag_dir = checkpoint_dir / tag
    if tag_dir.is_dir() and not (tag_dir / COMPLETE).is_file():
        raise ValueError(f"{tag_dir} is incomplete (no {COMPLETE}: its save was interrupted); export the tag that "
                         f"{checkpoint_dir}/latest names instead")
    module_file = Path(get_model_ckpt_name_for_rank(str(tag_dir), "00"))
    if not module_file.is_file():
        raise ValueError(f"{module_file} not found: {tag!r} is not a complete DeepSpeed checkpoint in {checkpoint_dir}")
    module = torch.load(module_file, map_location="cpu", weights_only=True, mmap=True)["module"]
    state = {name[:-len(ROUTER_WEIGHT)] + "gate.weight" if name.endswith(ROUTER_WEIGHT) else name: tensor
             for name, tensor in module.items()}

    arch = ARCHITECTURES[dense.model_type]
    num_experts = run.moe.num_experts[0] if isinstance(run.moe.num_experts, list) else run.moe.num_experts
    block_ids = resolve_moe_layers(run.moe.moe_layers, dense.num_hidden_layers)
    for moe_layer_id, block_id in enumerate(block_ids):  # DeepSpeed counts MoE layers in model order
        ffn = f"{arch.blocks}.{block_id}.{arch.ffn}"
        experts = [expert_weights(checkpoint_dir, tag, moe_layer_id, expert_id, f"{ffn}.{EXPERTS}.{expert_id}")
                   for expert_id in range(num_experts)]
        state[f"{ffn}.experts.gate_up_proj"], state[f"{ffn}.experts.down_proj"] = fuse_experts(experts)
        if config.model_type == "qwen2_moe":
            dtype = experts[0][0].dtype
            state.update({f"{ffn}.{name}": t for name, t in empty_shared_expert(dense.hidden_size, dtype).items()})
    return state


def expert_weights(checkpoint_dir: Path, tag: str, moe_layer_id: int, expert_id: int,
                   prefix: str) -> tuple[torch.Tensor, ...]:
    """(gate_proj, up_proj, down_proj) weights of one global expert, from its own DeepSpeed checkpoint file."""
    path = Path(DeepSpeedEngine._get_expert_ckpt_name(str(checkpoint_dir), moe_layer_id, expert_id, tag))
    if not path.is_file():
        raise ValueError(f"{path} not found: checkpoint {tag!r} lacks expert {expert_id} of MoE layer {moe_layer_id} "
                         "(an interrupted save, or run_config.json from another run)")
    weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return tuple(weights[f"{prefix}.{projection}.weight"] for projection in EXPERT_PROJECTIONS)


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
    run, _ = read_run(args.checkpoint.parent)
    for note in differences_in_training(run.moe):
        print(f"note: {note}")
    print(f"Wrote {config.architectures[0]} ({config.model_type}) and the tokenizer to {args.output}")


if __name__ == "__main__":
    main()
