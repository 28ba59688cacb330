"""A full LM training step, stock DeepSpeed MoE layer vs ours (--moe_impl grouped), side by side in one process.

Both models are built by convert_to_moe from the same dense preset with the same seed, so they hold the
same weights; each step is forward (LM loss + aux_loss_coef x balance loss), backward and an AdamW step.
The two run in interleaved timed blocks; the table gives the median seconds per step and the ratio.

    python bench/train_step.py                      # tiny-llama, 8 experts, top-2, 8 x 128 tokens
    python bench/train_step.py --drop_tokens false  # dropless
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_models import MoEConfig, convert_to_moe, moe_layers_of  # noqa: E402
from moe_models.config import _parse_bool  # noqa: E402
from moe_models.layer import balance_loss  # noqa: E402
from moe_models.model_source import preset_config  # noqa: E402


def build(impl: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    set_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(args.preset))
    cfg = MoEConfig(num_experts=args.num_experts, top_k=args.top_k, drop_tokens=args.drop_tokens,
                    expert_init="copy_noise", moe_impl=impl)
    model = convert_to_moe(model, cfg).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model, optimizer, input_ids, aux_loss_coef) -> None:
    loss = model(input_ids=input_ids, labels=input_ids).loss
    (loss + aux_loss_coef * balance_loss(moe_layers_of(model))).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--drop_tokens", type=_parse_bool, default=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    args = parser.parse_args()
    runs = {impl: build(impl, args) for impl in ("deepspeed", "grouped")}
    input_ids = torch.randint(0, preset_config(args.preset).vocab_size, (args.batch, args.seq),
                              generator=torch.Generator().manual_seed(0))
    times = {impl: [] for impl in runs}
    for impl, (model, optimizer) in runs.items():  # warm-up
        train_step(model, optimizer, input_ids, 0.01)
    for _ in range(args.rounds):
        for impl, (model, optimizer) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, optimizer, input_ids, 0.01)
            times[impl].append((time.perf_counter() - start) / args.steps)
    stock, ours = statistics.median(times["deepspeed"]), statistics.median(times["grouped"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset}, E{args.num_experts} "
          f"k{args.top_k}, drop_tokens={args.drop_tokens}, {args.batch} x {args.seq} tokens, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"\n| --moe_impl | s/step | vs deepspeed |\n|---|---|---|\n| deepspeed | {stock:.4f} | 1.00x |\n"
          f"| grouped | {ours:.4f} | {ours / stock:.2f}x |")


if __name__ == "__main__":
    main()
