"""Experts carved out of the dense FFN by its hidden units: granular upcycling (fine-grained experts, each one slice
of the units) and Drop-Upcycling (copies with some units re-drawn). Formulas and sources: docs/upcycling.md.

A dense FFN computes y = out(act(in_1(x), ...)) over F hidden units. Unit f is row f of each input projection's
weight and entry f of its bias, and column f of the output projection's weight (nn.Linear holds [out, in]; GPT-2's
Conv1D holds the transpose, [in, out]). ``HiddenUnits`` finds that dimension in every parameter through the family's
``ffn_projections`` (models/architectures.py); the output projection's bias belongs to no unit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..run.config import ConfigError, MoEConfig
from ..models.architectures import Architecture


@dataclass(frozen=True)
class HiddenUnits:
    """Where a dense FFN's hidden units sit in its parameters."""

    width: int              # F, the number of hidden units
    dims: dict[str, int]    # parameter name (as in the FFN's named_parameters) -> the dimension indexing its units
    output_weight: str      # the output projection's weight

    @classmethod
    def of(cls, ffn: nn.Module, projections: tuple[tuple[str, ...], str]) -> HiddenUnits:
        inputs, output = projections
        dims = {}
        for name in inputs:
            module = getattr(ffn, name)
            dims[f"{name}.weight"] = _out_features_dim(module)
            if module.bias is not None:
                dims[f"{name}.bias"] = 0
        dims[f"{output}.weight"] = 1 - _out_features_dim(getattr(ffn, output))
        params = dict(ffn.named_parameters())
        widths = {params[name].shape[dim] for name, dim in dims.items()}
        if len(widths) != 1:
            raise ValueError(f"the FFN's projections {projections} disagree on its hidden units (sizes {widths})")
        return cls(widths.pop(), dims, f"{output}.weight")


def _out_features_dim(module: nn.Module) -> int:
    """The dimension of a projection's weight that indexes its output features."""
    if isinstance(module, nn.Linear):
        return 0
    if isinstance(module, Conv1D):
        return 1
    raise ValueError(f"{type(module).__name__} is neither nn.Linear nor Conv1D: its hidden units cannot be found")


def unit_upcycling(dense_ffn: nn.Module, arch: Architecture, cfg: MoEConfig,
                   block_id: int) -> GranularUpcycling | DropUpcycling | None:
    """The GranularUpcycling or DropUpcycling of one dense FFN as ``cfg.expert_init`` asks, or None for the inits
    that take the FFN whole (copy, copy_noise, random). A ConfigError when the FFN does not fit the settings."""
    if cfg.expert_init not in ("granular", "drop"):
        return None
    units = HiddenUnits.of(dense_ffn, arch.ffn_projections)
    if cfg.expert_init == "drop":
        return DropUpcycling(dense_ffn, units, cfg.reinit_ratio)
    problems = granularity_problems(units.width, cfg.granularity, block_id)
    if problems:
        raise ConfigError(problems)
    return GranularUpcycling(dense_ffn, units, cfg.granularity)


def granularity_problems(width: int, granularity: int, block_id: int) -> list[str]:
    """Whether G slices of ``width`` hidden units can be cut (G must divide F)."""
    if width % granularity == 0:
        return []
    divisors = [str(d) for d in range(2, width + 1) if width % d == 0][:6]
    return [f"granularity ({granularity}) must divide the FFN's {width} hidden units (block {block_id}) for "
            f"--expert_init granular: pick a divisor of {width}, such as {', '.join(divisors)}"]


class GranularUpcycling:
    """Fine-grained experts from one dense FFN: expert e holds slice (e mod G) of its F hidden units, F/G wide,
    with the output projection's weight multiplied by G.

    Why G: the G experts of group g = e // G hold the G slices, whose outputs sum to the dense output; the router
    gives them equal rows (``grouped_router_rows``), so top_k = G chooses a whole group and DeepSpeed's renormalised
    weights give each 1/G. G x (1/G) x (sum of the slices) = the dense FFN's output. The same holds for top_k a
    multiple of G: each chosen group's weights sum to its share of 1.
    """

    def __init__(self, dense_ffn: nn.Module, units: HiddenUnits, granularity: int):
        self.dense_ffn, self.units, self.granularity = dense_ffn, units, granularity
        self.dense = {name: param.detach() for name, param in dense_ffn.named_parameters()}
        self.expert_width = units.width // granularity

    def expert_template(self) -> nn.Module:
        """A copy of the dense FFN narrowed to F/G hidden units (its first slice, unscaled: a placeholder): what
        DeepSpeed copies once per local expert before ``init_expert`` gives each its own slice."""
        template = copy.deepcopy(self.dense_ffn)
        for name, dim in self.units.dims.items():
            holder_name, _, attr = name.rpartition(".")
            holder, old = template.get_submodule(holder_name), template.get_parameter(name)
            narrowed = old.detach().narrow(dim, 0, self.expert_width).clone()
            setattr(holder, attr, nn.Parameter(narrowed, requires_grad=old.requires_grad))
            _match_feature_counts(holder)
        if hasattr(template, "intermediate_size"):
            template.intermediate_size = self.expert_width
        return template

    @torch.no_grad()
    def init_expert(self, weights: dict[str, torch.Tensor], expert_id: int, gen: torch.Generator) -> None:
        """Global expert ``expert_id``: slice (expert_id mod G) of every hidden-unit parameter, the output weight
        times G (computed in fp32). Draws nothing from ``gen``.

        The output projection's bias (GPT-2's c_proj, Llama's down_proj with mlp_bias) stays the dense bias b,
        whole, in every expert: expert e computes G x (its slice's share of the output + b/G), and the G experts of
        a group, weighed 1/G each, add up to the dense output with b counted once."""
        start = (expert_id % self.granularity) * self.expert_width
        for name, dim in self.units.dims.items():
            part = self.dense[name].narrow(dim, start, self.expert_width)
            weights[name].copy_(part.float() * self.granularity if name == self.units.output_weight else part)


def _match_feature_counts(module: nn.Module) -> None:
    """A projection's recorded sizes after its weight was narrowed (Conv1D's forward reads ``nf``)."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, Conv1D):
        module.nx, module.nf = module.weight.shape


def grouped_router_rows(num_experts: int, hidden_size: int, granularity: int, std: float,
                        gen: torch.Generator) -> torch.Tensor:
    """[E, D] router weight: one N(0, std^2) row per group of G experts, repeated for each expert of the group, so
    the G slices of a group get equal logits and are chosen together. G = 1: one fresh row per expert."""
    group_rows = torch.randn((num_experts // granularity, hidden_size), generator=gen) * std  # [E / G, D]
    return group_rows.repeat_interleave(granularity, dim=0)


class DropUpcycling:
    """Drop-Upcycling of one dense FFN: every expert is a copy of it (as DeepSpeed makes them) in which
    round(r x F) hidden units, chosen by the expert's own generator, are re-drawn."""

    def __init__(self, dense_ffn: nn.Module, units: HiddenUnits, ratio: float):
        self.dense_ffn, self.units, self.ratio = dense_ffn, units, ratio

    def expert_template(self) -> nn.Module:
        return self.dense_ffn

    @torch.no_grad()
    def init_expert(self, weights: dict[str, torch.Tensor], expert_id: int, gen: torch.Generator) -> None:
        redraw_units(weights, self.units, self.ratio, gen)


@torch.no_grad()
def redraw_units(weights: dict[str, torch.Tensor], units: HiddenUnits, ratio: float,
                 gen: torch.Generator) -> torch.Tensor:
    """Re-draw round(ratio x F) hidden units of one expert that is a copy of the dense FFN, in place: the units are
    the first of a random permutation drawn from ``gen``; in every hidden-unit parameter their entries are drawn
    from N(mean, std^2) of that whole parameter as it was (the dense FFN's). Returns the re-drawn units' indices."""
    chosen = torch.randperm(units.width, generator=gen)[:round(ratio * units.width)]
    for name, dim in units.dims.items():
        param = weights[name]
        mean, std = param.float().mean(), param.float().std()
        shape = list(param.shape)
        shape[dim] = len(chosen)
        fresh = torch.randn(shape, generator=gen) * std + mean
        param.index_copy_(dim, chosen.to(param.device), fresh.to(param.device, param.dtype))
    return chosen
