"""Host memory of building the MoE model (load the dense folder, then surgery), per rank, beside the plan's figure.

    python bench/build_memory.py --model_dir DIR --save              # once: a dense Llama (~0.85 B) with random weights
    deepspeed --num_gpus 2 bench/build_memory.py --model_dir DIR --ep_size 2 [--dtype bfloat16|float32]

Each rank loads DIR as train.py does (`load_dense_model`, in --dtype) and converts it (`convert_to_moe`, 4 experts,
top-2, copies), then prints: the peak resident memory of the process over the build minus its resident memory
before it (`ru_maxrss`; the safetensors are memory-mapped, so the pages read count while they are resident), the
bytes of the parameters it holds afterwards, and the plan's weights per rank (moe_models/training/preflight.py) for the same
settings in that dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _host_memory import GIB, PeakAbove, parameter_bytes  # noqa: E402
from moe_models.models.source import load_dense_model  # noqa: E402
from moe_models.moe.surgery import convert_to_moe  # noqa: E402
from moe_models.run.cli import parse_args  # noqa: E402
from moe_models.run.distributed import init_world  # noqa: E402
from moe_models.training.preflight import Setup, bytes_per_rank, model_shape  # noqa: E402

DENSE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def save_dense(model_dir: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**DENSE), dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters to {model_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", type=Path, required=True)
    parser.add_argument("--save", action="store_true", help="write the dense model to --model_dir and stop")
    parser.add_argument("--ep_size", type=int, default=1)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save:
        return save_dense(args.model_dir)
    cfg = parse_args(["--model_name_or_path", str(args.model_dir), "--num_experts", "4", "--top_k", "2",
                      "--ep_size", str(args.ep_size)])
    world = init_world()
    peak = PeakAbove()
    dtype = getattr(torch, args.dtype)
    dense = load_dense_model(cfg.model, vocab_needed=0, dtype=dtype)
    model = convert_to_moe(dense, cfg.moe, seed=0)
    held = parameter_bytes(model)
    setup = Setup(world_size=world.world_size, ep_size=args.ep_size, zero_stage=2, bf16=dtype == torch.bfloat16,
                  offload_optimizer=False, micro_batch=1, block_size=128, gradient_accumulation_steps=1,
                  activation_checkpointing=False)
    planned = bytes_per_rank(model_shape(cfg), setup)["weights"]
    print(f"rank {world.rank}: ep_size {args.ep_size}, {args.dtype}: build peak {peak.bytes() / GIB:.2f} GiB "
          f"above the {peak.before / GIB:.2f} GiB before it; parameters held {held / GIB:.2f} GiB; plan's weights "
          f"{planned / GIB:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
