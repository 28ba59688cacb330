"""Shared experts: always-on FFNs beside the routed experts of an MoE layer (DeepSeekMoE; Qwen1.5-MoE, Qwen2-MoE).

N shared experts are held as one FFN of the dense family's own class with N x F hidden units, as Qwen2-MoE's
``shared_expert`` and DeepSeek's ``shared_experts`` are: units [i F, (i + 1) F) are expert i, and the FFN's output
is the sum of the N experts' outputs (with one output bias). ``MoEFeedForward`` holds it as ``shared_experts``,
outside DeepSpeed's ``moe`` module, so its parameters are ordinary data-parallel ones. With ``--shared_expert_gate``
the output is scaled per token by sigmoid(``shared_expert_gate``(x)), a Linear(D, 1) without bias.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..metrics.routing import shared_share_sum


def widened_ffn(dense_ffn: nn.Module, projections: tuple[tuple[str, ...], str], copies: int) -> nn.Module:
    """An FFN of ``dense_ffn``'s class with ``copies`` x its hidden units, each block of units a copy of the dense
    FFN's: it computes copies x (W_out h(x)) + b_out. ``projections``: (the projections into the hidden units,
    the one out of them), by attribute name. Nothing is drawn at random."""
    inputs, output = projections
    ffn = copy.deepcopy(dense_ffn)
    for name in inputs:
        setattr(ffn, name, _tiled(getattr(dense_ffn, name), copies, into_units=True))
    setattr(ffn, output, _tiled(getattr(dense_ffn, output), copies, into_units=False))
    if isinstance(getattr(ffn, "intermediate_size", None), int):  # the HF MLPs keep their width
        ffn.intermediate_size *= copies
    return ffn


def _tiled(projection: nn.Module, copies: int, into_units: bool) -> nn.Module:
    """``projection`` (nn.Linear or GPT-2's Conv1D) repeated ``copies`` times along its hidden-unit side: its output
    features when it projects into the units (with its bias), else its input features (one bias)."""
    if not isinstance(projection, (nn.Linear, Conv1D)):
        raise TypeError(f"shared experts widen nn.Linear or Conv1D projections, not {type(projection).__name__}")
    weight_dim = 0 if into_units else 1  # nn.Linear's weight is [out, in], Conv1D's [in, out]
    if isinstance(projection, Conv1D):
        weight_dim = 1 - weight_dim
    tiled = copy.deepcopy(projection)
    tiled.weight = nn.Parameter(torch.cat([projection.weight.detach()] * copies, dim=weight_dim),
                                requires_grad=projection.weight.requires_grad)
    if into_units and projection.bias is not None:
        tiled.bias = nn.Parameter(projection.bias.detach().repeat(copies), requires_grad=projection.bias.requires_grad)
    if isinstance(tiled, Conv1D):
        tiled.nx, tiled.nf = tiled.weight.shape
    else:
        tiled.out_features, tiled.in_features = tiled.weight.shape
    return tiled


def zero_gate(hidden_size: int, like: torch.Tensor) -> nn.Linear:
    """The shared experts' gate, Linear(D, 1) without bias, at 0: sigmoid gives every token 1/2. Its dtype and
    device are ``like``'s; no random number is drawn."""
    with torch.device("meta"):
        gate = nn.Linear(hidden_size, 1, bias=False)
    gate.weight = nn.Parameter(torch.zeros(1, hidden_size, dtype=like.dtype, device=like.device))
    return gate


def shared_experts_output(ffn: nn.Module, gate: nn.Linear | None,
                          hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The shared experts' output for every token, times sigmoid(gate(x)) when there is a gate; and that factor
    ([..., 1], None without a gate)."""
    output = ffn(hidden_states)
    if gate is None:
        return output, None
    factor = torch.sigmoid(gate(hidden_states))
    return factor * output, factor


def upcycled_output_factors(num_shared: int, gated: bool) -> tuple[float, float, float]:
    """Factors on the output projections (W_out, b_out) that keep an upcycled layer's function the dense FFN's,
    y = W_out h(x) + b_out, at step 0: (each routed expert's W_out and b_out, the shared FFN's W_out, its b_out).

    The routed experts then give y / (N + 1) (their top-k weights sum to 1) and the N shared copies N y / (N + 1);
    with the gate, at sigmoid(0) = 1/2, the shared ones are doubled."""
    share = 1.0 / (num_shared + 1)
    gate = 2.0 if gated else 1.0
    return share, gate * share, gate * num_shared * share


@dataclass
class SharedSums:
    """One MoE layer's shared experts over the training forwards of a logging interval (float64)."""

    shared_share: torch.Tensor  # |shared| / (|shared| + |routed|) of each token's outputs, summed over tokens
    gate: torch.Tensor          # the gate factor, summed over tokens (0 without a gate)
    tokens: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> SharedSums:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in range(3)))


class SharedExpertCounters:
    """The sums of one MoE layer's shared experts since the last ``reset`` (``metrics.routing.shared_expert_metrics``
    turns them into the logged values)."""

    def __init__(self):
        self._sums: SharedSums | None = None

    @torch.no_grad()
    def add(self, routed: torch.Tensor, shared: torch.Tensor, gate: torch.Tensor | None) -> None:
        """One forward: the routed and (gated) shared outputs [..., D], the gate factors [..., 1] or None."""
        if self._sums is None:
            self._sums = SharedSums.zeros(routed.device)
        D = routed.shape[-1]
        self._sums.shared_share += shared_share_sum(routed.reshape(-1, D), shared.reshape(-1, D))
        if gate is not None:
            self._sums.gate += gate.double().sum()
        self._sums.tokens += routed.numel() // D

    def sums(self, device: torch.device) -> SharedSums:
        """The interval's sums (zeros before the first forward)."""
        return self._sums if self._sums is not None else SharedSums.zeros(device)

    def reset(self) -> None:
        self._sums = None
