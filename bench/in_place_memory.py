"""Host memory of continuing an HF MoE folder in place (each rank reads only its experts), per rank, beside the
weights per rank of the plan.

    python bench/in_place_memory.py --model_dir DIR --save [--layout fused]   # once: DeepSeek-V3, 1.02 B, random bf16
    deepspeed --num_gpus 2 bench/in_place_memory.py --model_dir DIR --ep_size 2

--save writes a DeepSeek-V3 (d 1024, 10 blocks, the first dense, 64 routed experts of width 512 and one shared
expert per sparse block, top-6; 1.02 B parameters, 0.91 B of them in routed experts) with random weights in bf16:
`save_pretrained` in the hub's layout, one tensor per expert (`...experts.{e}.gate_proj.weight`), or with
`--layout fused` in the model's own fused layout (`...experts.gate_up_proj` [E, 2F, D]).

Each rank then reads DIR as train.py does for such a folder (hf/in_place_run.py `continue_in_place`: the family's
probe, then hf/in_place_load.py, each rank reading only the slices of its experts), in bf16, and prints: the peak
resident memory of the process over the read, and again once every parameter has been read (a sum of each, as the
first step reads them), above its memory before it (bench/_host_memory.py; the safetensors are memory-mapped, so
the pages read count while they are resident, and a tensor kept as a view of the file has its pages read only when
it is first used), the bytes of the parameters it holds, and the plan's weights per rank (train.py --plan's
count of the folder, moe_models/training/preflight.py `bytes_per_rank`: every non-expert parameter plus
num_experts / ep_size experts per sparse block, 2 bytes each in bf16).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEEPSEEK_V3 = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=10,
                   num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=1,
                   num_experts_per_tok=6, n_group=8, topk_group=4, first_k_dense_replace=1, q_lora_rank=384,
                   kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, vocab_size=32000,
                   max_position_embeddings=2048)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", type=Path, required=True)
    parser.add_argument("--save", action="store_true", help="write the MoE checkpoint to --model_dir and stop")
    parser.add_argument("--layout", choices=["per_expert", "fused"], default="per_expert",
                        help="with --save: the hub's per-expert tensors, or the model's fused ones")
    parser.add_argument("--ep_size", type=int, default=1)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


def save(model_dir: Path, layout: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(DeepseekV3Config(**DEEPSEEK_V3), dtype=torch.bfloat16)
    model.save_pretrained(model_dir, save_original_format=layout == "per_expert")
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters to {model_dir} ({layout})")


def planned_weights(cfg, world_size: int) -> float:
    """The plan's weights per rank (bf16) of the run ``cfg`` describes (train.py --plan counts an in-place folder
    from its config: its class on the meta device, the routed experts split by ep_size)."""
    from moe_models.training.preflight import Setup, bytes_per_rank, model_shape

    setup = Setup(world_size=world_size, ep_size=cfg.moe.ep_size, zero_stage=2, bf16=True, offload_optimizer=False,
                  micro_batch=1, block_size=128, gradient_accumulation_steps=1, activation_checkpointing=False)
    return bytes_per_rank(model_shape(cfg), setup)["weights"]


def touch_every_parameter(model) -> None:
    """Read every parameter's bytes, as the first step will: a tensor that is a view of the memory-mapped file
    (a fused slice, stored as it is) has its pages read only now."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()


def measure(model_dir: Path, ep_size: int) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from _host_memory import GIB, PeakAbove, parameter_bytes
    from moe_models.hf.in_place_run import continue_in_place
    from moe_models.run.cli import parse_args
    from moe_models.run.distributed import init_world

    cfg = parse_args(["--model_name_or_path", str(model_dir), "--ep_size", str(ep_size)])
    world = init_world()
    peak = PeakAbove()
    model, _, _ = continue_in_place(str(model_dir), cfg.moe, torch.bfloat16, vocab_needed=0)
    read = peak.bytes()
    touch_every_parameter(model)
    held = parameter_bytes(model)
    planned = planned_weights(cfg, world.world_size)
    print(f"rank {world.rank}: ep_size {ep_size}, bf16, {model_dir.name}: peak {read / GIB:.2f} GiB over the read, "
          f"{peak.bytes() / GIB:.2f} GiB once every parameter is read, above the {peak.before / GIB:.2f} GiB before "
          f"it; parameters held {held / GIB:.2f} GiB; the plan's weights per rank "
          f"{planned / GIB:.2f} GiB", flush=True)


def main() -> None:
    args = parse()
    if args.save:
        return save(args.model_dir, args.layout)
    measure(args.model_dir, args.ep_size)


if __name__ == "__main__":
    main()
