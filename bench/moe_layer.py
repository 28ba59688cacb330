"""One MoE FFN layer, forward + backward, side by side in one process: every implementation against a dense
SwiGLU with the same active FLOPs (intermediate size f * k), on the same tokens.

Rows: dense SwiGLU; the stock DeepSpeed MoE layer (capacity factor 1.25, and dropless); HF's Mixtral
sparse block with its eager and grouped_mm experts; ours (--moe_impl grouped, dropless and capacity 1.25).
Candidates run in interleaved rounds so that load from other processes hits them alike; the table gives
the median milliseconds per forward + backward, the ratio to dense, and the peak memory of one step.

    python bench/moe_layer.py            # CPU shapes, fp32, 4096 tokens
    python bench/moe_layer.py --gpu      # the three GPU shapes, bf16, 16384 tokens
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from deepspeed.moe.layer import MoE
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, MixtralConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_models.models.architectures import SWIGLU_FFN_PROJECTIONS  # noqa: E402
from moe_models.moe.layer import GroupedMoE  # noqa: E402

CPU_SHAPES = [(256, 512, 8, 2), (256, 128, 32, 4)]                         # (d_model, d_ffn, experts, top_k)
GPU_SHAPES = [(2048, 5632, 8, 2), (4096, 14336, 8, 2), (2048, 1408, 64, 6)]


def candidates(d: int, f: int, num_experts: int, k: int) -> dict[str, torch.nn.Module]:
    llama = LlamaConfig(hidden_size=d, intermediate_size=f, hidden_act="silu")
    dense = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f * k, hidden_act="silu"))
    expert = LlamaMLP(llama)
    moe = dict(expert=expert, num_experts=num_experts, k=k, top2_2nd_expert_sampling=False, use_rts=False,
               min_capacity=0)
    built = {"dense SwiGLU (f*k)": dense,
             "DeepSpeed MoE, capacity 1.25": MoE(d, capacity_factor=1.25, **moe),
             "DeepSpeed MoE, dropless": MoE(d, drop_tokens=False, **moe)}
    for impl in ("eager", "grouped_mm"):
        config = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=num_experts,
                               num_experts_per_tok=k, hidden_act="silu")
        config._experts_implementation = impl
        built[f"HF Mixtral block, {impl}"] = MixtralSparseMoeBlock(config)
    built["ours (grouped), dropless"] = GroupedMoE(d, drop_tokens=False, ffn_projections=SWIGLU_FFN_PROJECTIONS, **moe)
    built["ours (grouped), capacity 1.25"] = GroupedMoE(d, capacity_factor=1.25, ffn_projections=SWIGLU_FFN_PROJECTIONS, **moe)
    with torch.no_grad():
        for module in built.values():
            for param in module.parameters():
                param.normal_(0, 0.02)
    return built


def step(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward and backward with a dense upstream gradient, as from the residual stream of a real model (a
    `.sum()` loss would hand every layer an expanded, stride-0 gradient, which some kernels copy batch by batch)."""
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(upstream_gradient(out))
    for param in module.parameters():
        param.grad = None
    x.grad = None


def upstream_gradient(out: torch.Tensor) -> torch.Tensor:
    """The same dense gradient for every candidate with this output shape."""
    key = (tuple(out.shape), out.dtype, out.device)
    if key not in _GRADIENTS:
        gen = torch.Generator().manual_seed(1)
        _GRADIENTS[key] = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    return _GRADIENTS[key]


_GRADIENTS: dict = {}


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages made inside the mode and still alive (CPU has no allocator stats)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {key: ref for key, ref in self.live.items() if not ref[0].expired()}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes():
                storage = tensor.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def peak_mib(module: torch.nn.Module, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(module, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakLiveBytes() as mode:
        step(module, x)
    return mode.peak / 2**20


def measure(modules: dict[str, torch.nn.Module], x: torch.Tensor, warmup: int, rounds: int, reps: int) -> dict:
    times = {name: [] for name in modules}
    for _ in range(warmup):
        for module in modules.values():
            step(module, x)
    for _ in range(rounds):
        for name, module in modules.items():
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                step(module, x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / reps * 1000)
    return {name: (statistics.median(t), peak_mib(modules[name], x)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, the GPU shapes, 16384 tokens")
    parser.add_argument("--tokens", type=int, help="tokens per step (default 4096 on CPU, 16384 on GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    tokens = args.tokens or (16384 if args.gpu else 4096)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if args.gpu else f", {torch.get_num_threads()} threads")
          + f", {dtype}, {tokens} tokens, median of {args.rounds} rounds x {args.reps} steps, forward + backward")
    for d, f, num_experts, k in GPU_SHAPES if args.gpu else CPU_SHAPES:
        torch.manual_seed(0)
        modules = candidates(d, f, num_experts, k)
        modules = {name: m.to(device, dtype).train() for name, m in modules.items()}
        x = torch.randn(1, tokens, d, device=device, dtype=dtype, requires_grad=True)
        results = measure(modules, x, args.warmup, args.rounds, args.reps)
        dense_ms = results["dense SwiGLU (f*k)"][0]
        print(f"\n| d{d} f{f} E{num_experts} k{k} | ms | x dense | peak MiB |\n|---|---|---|---|")
        for name, (ms, mib) in results.items():
            print(f"| {name} | {ms:.2f} | {ms / dense_ms:.2f}x | {mib:.0f} |")


if __name__ == "__main__":
    main()
