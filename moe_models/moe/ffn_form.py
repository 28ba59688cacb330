"""What a dense FFN computes, in a form grouped GEMMs can run: its input projections, how they combine into the hidden
units, its output projection. ``ffn_form`` reads the form off an FFN module and checks it on values, so a grouped
expert path computes what the family's own forward does.

The forms: gated, down(act(gate(x)) * up(x)), with the gate and up projections apart or fused in one projection of
2F outputs (gate first); and plain, out(act(in(x))). Projections are nn.Linear or GPT-2's Conv1D, with or without
biases. The activation is DeepSpeed's (``deepspeed.moe.ep_experts``' registry: swiglu, geglu_tanh) where one is the
same function, else the family's own ``act_fn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from deepspeed.moe.ep_experts import EXPERT_ACTIVATIONS, apply_expert_activation
from torch import nn
from transformers.pytorch_utils import Conv1D

# Where HF FFNs keep their activation.
ACTIVATION_NAMES = ("act_fn", "act", "activation_fn", "activation", "act_func", "activation_function")
PROBE_ROWS = 5


@dataclass(frozen=True)
class FFNForm:
    inputs: tuple[str, ...]   # (gate, up), (gate_up,) or (in,): the projections into the hidden units
    output: str               # the projection out of them
    gated: bool
    activation: Optional[str]  # DeepSpeed's name for the gated activation, when it has it
    act_fn: Callable           # the family's own activation (used when ``activation`` is None)

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.inputs, self.output)

    def hidden_units(self, projected: list[torch.Tensor]) -> torch.Tensor:
        """The hidden units from the input projections' outputs (in ``inputs`` order)."""
        if not self.gated:
            return self.act_fn(projected[0])
        gate, up = projected if len(projected) == 2 else projected[0].chunk(2, dim=-1)
        if self.activation is not None:  # fused kernels are GPU ones
            return apply_expert_activation(gate, up, self.activation, fused=gate.is_cuda)
        return self.act_fn(gate) * up


def ffn_form(ffn: nn.Module, projections: tuple[tuple[str, ...], str]) -> FFNForm | str:
    """The form of ``ffn`` whose projections are ``projections`` (into the hidden units, out of them), checked
    against ``ffn``'s forward on a random probe; or why there is none (a sentence)."""
    inputs, output = projections
    layers = [getattr(ffn, name, None) for name in (*inputs, output)]
    if not all(isinstance(layer, (nn.Linear, Conv1D)) for layer in layers):
        return "its projections are not all nn.Linear or Conv1D"
    dropouts = [m.p for m in ffn.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropouts:
        return f"it applies dropout (p={dropouts[0]}), which a grouped form would leave out"
    activations = _activations(ffn, set(inputs) | {output})
    if any(next(act.parameters(), None) is not None for act in activations if isinstance(act, nn.Module)):
        return "its activation has learnable parameters, which each expert would hold"
    candidates = [FFNForm(order, output, gated, _registered(act) if gated else None, act)
                  for act in activations for order, gated in _orders(ffn, inputs, output)]
    weight = layers[0].weight
    if weight.is_meta:  # shapes only (a plan): the first form that fits the shapes
        return candidates[0]
    for form in candidates:
        if _computes_the_same(ffn, form):
            return form
    return "no gated or plain form computes what its forward does (checked on a probe)"


def _activations(ffn: nn.Module, projections: set[str]) -> list[Callable]:
    """The FFN's own activation (an attribute or a child module); else DeepSpeed's gate functions, for forwards
    that call one inline (LFM2's F.silu)."""
    named = [getattr(ffn, name) for name in ACTIVATION_NAMES if callable(getattr(ffn, name, None))]
    children = [child for name, child in ffn.named_children() if name not in projections
                and not isinstance(child, nn.Dropout)]
    inline = [entry.gate_fn for entry in EXPERT_ACTIVATIONS.values() if entry.gate_fn is not None]
    return named or children or inline


def _orders(ffn: nn.Module, inputs: tuple[str, ...], output: str) -> list[tuple[tuple[str, ...], bool]]:
    """The (inputs in order, gated) readings of the input projections that fit their shapes."""
    if len(inputs) == 2:
        return [(inputs, True), (inputs[::-1], True)]
    if out_features(getattr(ffn, inputs[0])) == 2 * in_features(getattr(ffn, output)):
        return [(inputs, True)]
    return [(inputs, False)]


def _registered(act_fn: Callable) -> Optional[str]:
    """The name of DeepSpeed's expert activation gate_fn(gate) * up whose gate_fn computes ``act_fn``, if any."""
    probe = torch.linspace(-6, 6, 49)
    for name, entry in EXPERT_ACTIVATIONS.items():
        if entry.gate_fn is None or entry.uses_alpha or entry.uses_limit:
            continue
        try:
            if torch.allclose(act_fn(probe), entry.gate_fn(probe), atol=1e-6):
                return name
        except (RuntimeError, TypeError):
            return None
    return None


@torch.no_grad()
def _computes_the_same(ffn: nn.Module, form: FFNForm) -> bool:
    weight = getattr(ffn, form.output).weight
    x = torch.randn(PROBE_ROWS, in_features(getattr(ffn, form.inputs[0])),
                    generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        expected = ffn(x)  # no dropout (ffn_form refuses FFNs with some), so training mode computes the same
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = getattr(ffn, form.output)(form.hidden_units([getattr(ffn, n)(x) for n in form.inputs]))
    except (RuntimeError, TypeError, ValueError):
        return False
    tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
    return expected.shape == got.shape and torch.allclose(got.float(), expected.float(), rtol=tolerance,
                                                           atol=tolerance)


def in_features(layer: nn.Module) -> int:
    return layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.in_features


def out_features(layer: nn.Module) -> int:
    return layer.nf if isinstance(layer, Conv1D) else layer.out_features


def is_conv1d(layer: nn.Module) -> bool:
    """GPT-2's Conv1D holds its weight as [in, out], the transpose of nn.Linear's."""
    return isinstance(layer, Conv1D)
