"""convert_to_moe: replace the FFN of chosen transformer blocks by DeepSpeed MoE layers (upcycling)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .architectures import architecture_of
from .config import ConfigError, MoEConfig, moe_problems, resolve_moe_layers
from .layer import MoEFeedForward


def experts_per_layer(num_experts: int | list[int], num_moe_layers: int) -> list[int]:
    """One expert count per MoE layer: an int repeats, a list (pyramid MoE) must match the layer count."""
    if isinstance(num_experts, int):
        return [num_experts] * num_moe_layers
    if len(num_experts) != num_moe_layers:
        raise ConfigError([f"num_experts lists {len(num_experts)} counts but moe_layers selects {num_moe_layers} "
                           "blocks; give one count per MoE layer or a single count"])
    return list(num_experts)


def convert_to_moe(model: nn.Module, cfg: MoEConfig, seed: int = 0) -> nn.Module:
    """Replace the FFN of the blocks chosen by ``cfg.moe_layers`` with DeepSpeed MoE layers, in place.

    Experts start from the dense FFN as ``cfg.expert_init`` says; the router starts fresh (normal,
    std = the model's initializer_range). Every random draw is seeded by (seed, block, global expert
    id), so the same seed builds the same model at any ep_size. Returns the model.
    """
    problems = moe_problems(cfg)
    if problems:
        raise ConfigError(problems)
    arch = architecture_of(model)
    blocks = arch.blocks_of(model)
    try:
        block_ids = resolve_moe_layers(cfg.moe_layers, len(blocks))
    except ValueError as err:
        raise ConfigError([str(err)]) from None
    counts = experts_per_layer(cfg.num_experts, len(block_ids))
    init_std = getattr(model.config, "initializer_range", 0.02)
    hidden_size = model.config.hidden_size

    for block_id, num_experts in zip(block_ids, counts):
        block = blocks[block_id]
        dense_ffn = getattr(block, arch.ffn)
        layer = MoEFeedForward(dense_ffn, hidden_size, num_experts, cfg, arch.gated_projections)
        _init_router(layer.router, init_std, _generator(seed, block_id, -1))
        for weights, global_id in zip(layer.local_expert_weights(), layer.global_expert_ids()):
            _init_expert(weights, cfg, init_std, _generator(seed, block_id, global_id))
        setattr(block, arch.ffn, layer)
    return model


def _generator(seed: int, block_id: int, expert_id: int) -> torch.Generator:
    """A generator owned by one (block, expert): independent of the rank, the ep_size and global RNG state."""
    state = np.random.SeedSequence([seed, block_id, expert_id + 1]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@torch.no_grad()
def _init_router(router: nn.Linear, std: float, gen: torch.Generator) -> None:
    router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * std)


@torch.no_grad()
def _init_expert(weights: dict[str, torch.Tensor], cfg: MoEConfig, std: float, gen: torch.Generator) -> None:
    """The expert (its weights by name, in module order) arrives as a copy of the dense FFN; perturb or re-draw
    it as cfg.expert_init says."""
    if cfg.expert_init == "copy":
        return
    for name, param in weights.items():
        if cfg.expert_init == "copy_noise":
            scale = cfg.expert_noise_std * param.float().std().item() if param.numel() > 1 else 0.0
            param.add_((torch.randn(param.shape, generator=gen) * scale).to(param.dtype))
        elif param.dim() >= 2:  # "random": weight matrices drawn like the model's own init, biases zero
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        elif name.endswith("bias"):
            param.zero_()
