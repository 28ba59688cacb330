"""--compile: torch.compile per decoder block, as torchtitan does, and the settings it cannot work with.

Each block compiles in place (``nn.Module.compile``), not wrapped (``torch.compile(block)`` would prefix every
state-dict key with ``_orig_mod.``), so checkpoints, resharding and export see the eager model's names. The blocks of
one model share their code, so one compile serves them all (and one more for eval, which runs without grad).
``dynamic=False``: a training step's shapes never change (the rows per expert are data, not shapes: the grouped
GEMM takes them as offsets), and a shape that does change (the last eval batch) gets a graph of its own.

Checked on CPU (docs/performance.md#torchcompile): bf16 with the grouped experts at ep_size 1 and 2, with
--gradient_checkpointing, and fp32 with --moe_impl deepspeed. Refused: the grouped experts in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.architectures import architecture_of
from ..run.config import RunConfig


def compile_problems(cfg: RunConfig, dtype: torch.dtype) -> list[str]:
    """What --compile cannot work with, each with what to use instead; ``dtype``: the dtype the run trains in."""
    if not cfg.train.compile:
        return []
    problems = []
    if cfg.moe.moe_impl == "grouped" and dtype != torch.bfloat16 and cfg.moe.moe_layers != "none":
        problems.append(
            f"--compile with --moe_impl grouped needs bf16 (this run trains in {str(dtype).removeprefix('torch.')}): "
            "torch's compiler kernel of the grouped GEMM (torch._grouped_mm) takes bf16 inputs only, on every device. "
            "Train in bf16 (a DeepSpeed JSON with \"bf16\": {\"enabled\": true}; the shipped configs' \"auto\" is "
            "bf16 on GPUs that support it); in fp32, --moe_impl deepspeed (the stock layer) compiles, with graph "
            "breaks at its host reads; or drop --compile")
    return problems


def compile_blocks(model: nn.Module) -> int:
    """Compile each decoder block of ``model`` in place; returns how many."""
    blocks = architecture_of(model).blocks_of(model)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)
