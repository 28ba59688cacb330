"""convert_to_moe: replace the FFN of chosen transformer blocks by DeepSpeed MoE layers (upcycling)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models.architectures import architecture_of
from ..models.discovery import hidden_size_of
from ..run.config import ConfigError, MoEConfig
from ..run.moe_layout import MoELayout
from .checks import moe_problems
from .layer import MoEFeedForward
from .parallel import make_expert_parallel_groups, parallel_problems
from .proof import prove_conversion
from .saved_settings import attach_settings
from .shared import upcycled_output_factors
from .upcycling import grouped_router_rows, unit_upcycling

# The spawn key of a layer's shared-experts generator: a stream apart from every (block, expert) and router one.
SHARED_EXPERTS_STREAM = (1,)


def convert_to_moe(model: nn.Module, cfg: MoEConfig, seed: int = 0) -> nn.Module:
    """Replace the FFN of the blocks ``cfg`` names (``cfg.moe_layers``; its MoELayout, resolved once against the
    model's blocks) with DeepSpeed MoE layers, in place.

    Experts start from the dense FFN as ``cfg.expert_init`` says (granular and drop: moe/upcycling.py); the router
    starts fresh (normal, std = the model's initializer_range; for granular experts one row per group of
    ``cfg.granularity``). Every random draw is seeded by (seed, block, global expert id), so the same seed builds
    the same model at any ep_size. Shared experts (``cfg.num_shared_experts``) start as copies of the dense FFN
    (with noise for copy_noise, fresh for random), from their own generator per block; upcycled, the output
    projections of routed and shared experts are scaled so that the layer computes the dense FFN
    (``_keep_dense_function``). The settings and layout are kept on the model (``moe.saved_settings.settings_of``)
    for trainers and export. Unless ``cfg.prove_conversion`` is off, the conversion is first proven on a probe model of
    the family (moe/proof.py; a ValueError saying what was found when it fails); a model on the meta device (the
    preflight plan, an import filling its weights afterwards) is converted for its shapes: no proof, nothing drawn.
    Returns the model.
    """
    problems = moe_problems(cfg) + parallel_problems(cfg)
    if problems:
        raise ConfigError(problems)
    make_expert_parallel_groups(cfg.ep_size)  # before any layer: experts are initialised by their global id
    shapes_only = next(model.parameters()).is_meta  # the plan, an import: nothing to run or draw
    if cfg.prove_conversion and not shapes_only:
        prove_conversion(type(model), model.config, cfg, convert_to_moe)
    arch = architecture_of(model)
    blocks = arch.blocks_of(model)
    layout = layout_of(model, cfg)
    text_config = model.config.get_text_config()  # composite (multimodal) configs hold the decoder's apart
    init_std = getattr(text_config, "initializer_range", None) or getattr(model.config, "initializer_range", 0.02)
    hidden_size = hidden_size_of(model)

    for block_id, num_experts in zip(layout.blocks, layout.num_experts):
        block = blocks[block_id]
        dense_ffn = getattr(block, arch.ffn)
        by_units = unit_upcycling(dense_ffn, arch, cfg, block_id)  # granular or drop; None for whole-FFN inits
        expert = by_units.expert_template() if by_units else dense_ffn
        layer = MoEFeedForward(dense_ffn, hidden_size, num_experts, cfg, arch.ffn_projections, expert=expert)
        if layer.moe.use_residual:  # the residual FFN is the whole dense FFN, whatever the experts hold
            layer.moe.mlp = dense_ffn
        if not shapes_only:
            _initialise(layer, by_units, cfg, layout, init_std, seed, block_id, output=arch.ffn_projections[1])
        setattr(block, arch.ffn, layer)
    attach_settings(model, cfg, layout)
    return model


def _initialise(layer: MoEFeedForward, by_units, cfg: MoEConfig, layout: MoELayout, init_std: float, seed: int,
                block_id: int, output: str) -> None:
    """The router drawn fresh, each local expert as ``cfg.expert_init`` says (by its global id), the shared experts;
    upcycled, the output projections scaled to keep the dense function."""
    _init_router(layer.router.wg, layer.num_experts, init_std, _generator(seed, block_id, -1), layout.granularity)
    for weights, global_id in zip(layer.local_expert_weights(), layer.global_expert_ids()):
        gen = _generator(seed, block_id, global_id)
        if by_units:
            by_units.init_expert(weights, global_id, gen)
        else:
            _init_expert(weights, cfg, init_std, gen)
    if layer.shared_experts is not None:
        shared = dict(layer.shared_experts.named_parameters())
        if cfg.expert_init in ("copy_noise", "random"):  # granular and drop keep whole copies of the dense FFN
            _init_expert(shared, cfg, init_std, _generator(seed, block_id, -1, SHARED_EXPERTS_STREAM))
        if cfg.expert_init != "random":
            _keep_dense_function(layer, shared, layout, cfg.shared_expert_gate, output=output)


def layout_of(model: nn.Module, cfg: MoEConfig) -> MoELayout:
    """The MoE layout ``cfg`` gives this dense model (a ConfigError when it does not fit its blocks)."""
    return MoELayout.resolve(cfg, len(architecture_of(model).blocks_of(model)))


def _generator(seed: int, block_id: int, expert_id: int, spawn_key: tuple[int, ...] = ()) -> torch.Generator:
    """A generator owned by one (block, expert), the router being expert -1: independent of the rank, the ep_size
    and global RNG state. A ``spawn_key`` gives the block another stream of its own (the shared experts')."""
    state = np.random.SeedSequence([seed, block_id, expert_id + 1], spawn_key=spawn_key).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@torch.no_grad()
def _init_router(router: nn.Linear, num_experts: int, std: float, gen: torch.Generator, granularity: int) -> None:
    """N(0, std^2) rows, one per expert, or with granular experts one per group of ``granularity`` experts; then one
    per null expert (rows past ``num_experts``), drawn after the experts' so that those do not change."""
    rows = grouped_router_rows(num_experts, router.in_features, granularity, std, gen)
    nulls = router.out_features - num_experts
    if nulls:
        rows = torch.cat([rows, torch.randn((nulls, router.in_features), generator=gen) * std])
    router.weight.copy_(rows)


@torch.no_grad()
def _init_expert(weights: dict[str, torch.Tensor], cfg: MoEConfig, std: float, gen: torch.Generator) -> None:
    """The expert (its weights by name, in module order) arrives as a copy of the dense FFN; perturb or re-draw
    it as cfg.expert_init says (copy, copy_noise or random)."""
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


@torch.no_grad()
def _keep_dense_function(layer: MoEFeedForward, shared: dict[str, torch.Tensor], layout: MoELayout, gated: bool,
                         output: str) -> None:
    """Scale the output projection (``output``) of each local routed expert and of the shared experts (their
    weights by name: ``shared``) by ``upcycled_output_factors``, so that the upcycled layer computes the dense FFN
    (exactly with copies and top_k >= 2)."""
    routed, shared_weight, shared_bias = upcycled_output_factors(layout.shared_copies, gated)
    for weights in layer.local_expert_weights():
        _scale_projection(weights, output, routed, routed)
    _scale_projection(shared, output, shared_weight, shared_bias)


def _scale_projection(weights: dict[str, torch.Tensor], projection: str, weight_factor: float,
                      bias_factor: float) -> None:
    """Multiply the weight and bias of ``projection`` among ``weights`` (by name) in place."""
    for name, param in weights.items():
        if name == f"{projection}.weight":
            param.mul_(weight_factor)
        elif name == f"{projection}.bias":
            param.mul_(bias_factor)
