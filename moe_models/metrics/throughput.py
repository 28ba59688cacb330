"""Tokens per second, step time and model FLOPs utilisation (MFU) of a logging interval.

MFU counts the FLOPs the model needs per token, from a formula (PaLM, Chowdhery et al. 2022,
appendix B), not the FLOPs the kernels ran: DeepSpeed's flops profiler would count capacity
padding and idle expert slots as work, which is what MFU is meant to expose.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Dense (no sparsity) bf16 tensor-core peak of one GPU, TFLOPS, as the vendor datasheets give it
# (the sheets list twice these figures "with sparsity"). Matched in order against
# torch.cuda.get_device_name(); the first match wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*NVL", 835.0),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),  # SXM
    (r"H200.*NVL", 835.0),
    (r"H200", 989.0),  # SXM
    (r"A100", 312.0),
    (r"\bA10\b", 125.0),
    (r"\bL4\b", 121.0),
]


def known_peak_tflops(device_name: str) -> float | None:
    """The table's bf16 dense peak for a GPU name, or None when the GPU is not in the table."""
    return next((tflops for pattern, tflops in PEAK_BF16_TFLOPS if re.search(pattern, device_name)), None)


def resolve_peak_tflops(flag: float | None, device: torch.device, bf16: bool) -> tuple[float | None, str]:
    """The peak MFU is measured against and where it came from; (None, why) when there is none."""
    if flag is not None:
        return flag, "--peak_tflops"
    if device.type != "cuda":
        return None, "no peak is known for CPUs; pass --peak_tflops to report mfu"
    name = torch.cuda.get_device_name(device)
    if not bf16:
        return None, f"the table holds bf16 peaks and this run on {name} is not bf16; pass --peak_tflops"
    peak = known_peak_tflops(name)
    if peak is None:
        return None, f"{name} is not in the peak table (moe_models/metrics/throughput.py); pass --peak_tflops"
    return peak, f"{name} bf16 dense datasheet peak"


def active_parameters(model: nn.Module, layers) -> int:
    """Parameters one token's forward multiplies by, for an HF causal LM and its MoEFeedForward ``layers``.

    Every parameter except embedding lookups (an output embedding tied to the input one counts), with
    each MoE layer's experts counted as top_k experts (the router, the shared experts and their gate, and a
    residual MoE's dense FFN count whole). Works on any rank: with ep_size > 1 the model holds a slice of the
    experts.
    """
    output = model.get_output_embeddings()
    tied = output.weight if output is not None else None
    lookups = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is not tied)
    local_experts = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    active_experts = sum(layer.top_k * sum(w.numel() for w in layer.local_expert_weights()[0].values())
                         for layer in layers)
    return sum(p.numel() for p in model.parameters()) - lookups - local_experts + active_experts


def expert_parameters(layer) -> int:
    """Parameters of one routed expert of an MoEFeedForward layer (every expert of a layer has the same)."""
    return sum(w.numel() for w in layer.local_expert_weights()[0].values())


def expert_flops_per_token(expert_params: int, experts_per_token: float) -> float:
    """Training FLOPs per token of the routed experts a token runs: 6 x parameters per expert x experts run (the
    counting of ``flops_per_token``)."""
    return 6 * expert_params * experts_per_token


def attention_dims(config) -> tuple[int, int]:
    """(layers, query heads x head dim) of an HF config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def flops_per_token(active_params: int, num_layers: int, attention_width: int, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6 N + 12 L d T (PaLM; the causal mask is not
    halved out, as in PaLM, nanoGPT and torchtitan)."""
    return 6 * active_params + 12 * num_layers * attention_width * seq_len


def throughput_metrics(tokens: float, steps: float, seconds: float, world_size: int, flops_per_token: float,
                       peak_tflops: float | None, spent_flops_per_token: float | None = None) -> dict:
    """Speed of one logging interval: ``tokens`` (all ranks) in ``steps`` optimizer steps and ``seconds``.
    ``mfu`` counts top_k experts per token; with ``spent_flops_per_token`` (the FLOPs of the real experts the tokens
    ran, MoELayers.spent_flops_per_token) also ``flops_per_token_spent`` and ``mfu_spent``."""
    tokens_per_sec = tokens / max(seconds, 1e-9)
    row = {"tokens_per_sec": tokens_per_sec, "tokens_per_sec_per_device": tokens_per_sec / world_size,
           "step_time": seconds / steps}
    if spent_flops_per_token is not None:
        row["flops_per_token_spent"] = spent_flops_per_token
    if peak_tflops is not None:
        row["mfu"] = tokens_per_sec / world_size * flops_per_token / (peak_tflops * 1e12)
        if spent_flops_per_token is not None:
            row["mfu_spent"] = tokens_per_sec / world_size * spent_flops_per_token / (peak_tflops * 1e12)
    return row
