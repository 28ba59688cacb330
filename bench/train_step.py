"""A full LM training step side by side in one process: the stock DeepSpeed MoE layer, ours (--moe_impl grouped)
and, as a peer, HF's Mixtral in plain torch with its grouped_mm experts.

The two DeepSpeed MoE models are built by convert_to_moe from the same dense Llama with the same seed, so they hold
the same weights; Mixtral is built from the same sizes. Each step is forward (LM loss + 0.01 x balance loss),
backward and an AdamW step. The candidates run in interleaved timed blocks; the table gives the median seconds per
step, tokens/s, the ratio to the stock layer and, on a GPU in the peak table, MFU (the model FLOPs of
moe_models/throughput.py: 6 x active parameters + attention, per token).

    python bench/train_step.py                      # CPU: tiny-llama, 8 experts, top-2, 8 x 128 tokens, fp32
    python bench/train_step.py --drop_tokens false  # dropless
    python bench/train_step.py --gpu                # Llama-MoE d1024 f3584 L8 E8 k2, 8 x 2048 tokens, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_models import MoEConfig, convert_to_moe, moe_layers_of  # noqa: E402
from moe_models.metrics.throughput import active_parameters, attention_dims, flops_per_token, known_peak_tflops  # noqa: E402
from moe_models.models.source import preset_config  # noqa: E402
from moe_models.moe.model_layers import balance_loss  # noqa: E402
from moe_models.run.cli import parse_bool  # noqa: E402

# The GPU reference model: Llama blocks, d1024, 8 layers; FFN 3584 (3.5 x d, Mixtral's ratio), 16 heads, 8 KV heads.
GPU_LLAMA = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
SHARED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")


def deepspeed_moe(impl: str, dense: LlamaConfig, args) -> torch.nn.Module:
    set_seed(0)
    cfg = MoEConfig(num_experts=args.num_experts, top_k=args.top_k, drop_tokens=args.drop_tokens,
                    expert_init="copy_noise", moe_impl=impl)
    return convert_to_moe(AutoModelForCausalLM.from_config(dense), cfg)


def mixtral(dense: LlamaConfig, args) -> torch.nn.Module:
    set_seed(0)
    config = MixtralConfig(**{name: getattr(dense, name) for name in SHARED}, num_local_experts=args.num_experts,
                           num_experts_per_tok=args.top_k, output_router_logits=True, router_aux_loss_coef=0.01)
    config._experts_implementation = "grouped_mm"
    return AutoModelForCausalLM.from_config(config)


def train_step(model, optimizer, input_ids) -> None:
    out = model(input_ids=input_ids, labels=input_ids)
    layers = moe_layers_of(model)
    # Mixtral adds its own balance loss (router_aux_loss_coef x aux_loss) to out.loss
    loss = out.loss + 0.01 * balance_loss(layers) if layers else out.loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, the reference model and 8 x 2048 tokens")
    parser.add_argument("--preset", default="tiny-llama", help="the dense model on CPU (a built-in preset)")
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--drop_tokens", type=parse_bool, default=True,
                        help="capacity factor 1.0 for the DeepSpeed layers (Mixtral is always dropless)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 128 on CPU, 2048 on GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    args = parser.parse_args()
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    seq = args.seq or (2048 if args.gpu else 128)
    dense = LlamaConfig(**GPU_LLAMA) if args.gpu else preset_config(args.preset)

    models = {"DeepSpeed MoE (--moe_impl deepspeed)": deepspeed_moe("deepspeed", dense, args),
              "ours (--moe_impl grouped)": deepspeed_moe("grouped", dense, args),
              "HF Mixtral, grouped_mm (plain torch)": mixtral(dense, args)}
    ours = models["ours (--moe_impl grouped)"]
    flops = flops_per_token(active_parameters(ours, moe_layers_of(ours)), *attention_dims(dense), seq)
    runs = {}
    for name, model in models.items():
        model = model.to(device, dtype).train()
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    input_ids = torch.randint(0, dense.vocab_size, (args.batch, seq), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)

    times = {name: [] for name in runs}
    for model, optimizer in runs.values():  # warm-up
        train_step(model, optimizer, input_ids)
    for _ in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, optimizer, input_ids)
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)

    peak = known_peak_tflops(torch.cuda.get_device_name()) if args.gpu else None
    where = torch.cuda.get_device_name() if args.gpu else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {dtype}, d{dense.hidden_size} f{dense.intermediate_size} "
          f"L{dense.num_hidden_layers} E{args.num_experts} k{args.top_k}, drop_tokens={args.drop_tokens}, "
          f"{args.batch} x {seq} tokens, median of {args.rounds} rounds x {args.steps} steps, "
          f"{flops / 1e9:.3f} GFLOP per token")
    print("\n| model | s/step | tokens/s | vs DeepSpeed MoE | MFU |\n|---|---|---|---|---|")
    stock = statistics.median(times["DeepSpeed MoE (--moe_impl deepspeed)"])
    for name, samples in times.items():
        seconds = statistics.median(samples)
        tokens_per_s = args.batch * seq / seconds
        mfu = f"{100 * tokens_per_s * flops / (peak * 1e12):.1f}%" if peak else "n/a"
        print(f"| {name} | {seconds:.4f} | {tokens_per_s:.0f} | {seconds / stock:.2f}x | {mfu} |")


if __name__ == "__main__":
    main()
