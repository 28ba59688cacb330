"""One adapter per native transformers MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoeShared, GLM4-MoE): its
weights' names, both ways (GraniteMoeShared and GLM4-MoE: export only).

An adapter turns a DeepSpeed MoE model's state (the stock layer's names, moe/layer.py) into the HF class's
state (export), and reads the HF class's checkpoint back for any DeepSpeed parameter (import). The other
weights (embeddings, attention, norms, dense FFNs) keep their names in both models.

On disk, HF experts come in one of two layouts. transformers 5 holds them fused: ``experts.gate_up_proj``
[E, 2F, D] (gate rows first, as the forward's ``chunk(2)`` reads them) and ``experts.down_proj`` [E, D, F]. But
save_pretrained writes, and the hub holds, one tensor per expert under each family's original names, which
transformers' conversion_mapping.py fuses inside from_pretrained. Export writes the fused layout; import reads
both, itself, because from_pretrained has no way to load only some experts.

Shared experts (``<ffn>.shared_experts.{gate,up,down}_proj`` and ``<ffn>.shared_expert_gate``, moe/shared.py) are
Qwen2-MoE's ``shared_expert`` and ``shared_expert_gate``, and GraniteMoeShared's ``shared_mlp`` (gate and up rows
fused as ``input_linear``, gate rows first; no gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.architectures import SWIGLU, Architecture
from ..moe.layer import (ROUTER_SCORE_BIAS, ROUTER_WEIGHT, SHARED_EXPERT_GATE_WEIGHT, SHARED_EXPERTS_MODULE,
                         expert_weight_key)
from ..moe.layout import MoELayout

GATE, UP, DOWN = range(3)  # index of a projection in a (gate, up, down) triple


@dataclass(frozen=True)
class MoEFamilyAdapter:
    model_type: str             # the transformers MoE config's model_type
    # the dense family an HF MoE checkpoint is imported as: the one whose attention, norms and embeddings are the
    # MoE class's own
    dense_model_type: str
    # the sparse block's attribute in a decoder block in the per-expert layout, and the (gate, up, down) weight names
    # of one expert there: how import reads the hub's checkpoints (None: an export-only family)
    per_expert_block: str | None = None
    per_expert_names: tuple[str, str, str] | None = None
    # the sparse block's attribute in a decoder block in the fused layout when it is not the FFN's (Granite's sits at
    # block_sparse_moe), and the name of its router there
    fused_block: str | None = None
    router_name: str = "gate"

    # -- names --------------------------------------------------------------------------------------------------

    def fused_block_of(self, ffn: str) -> str:
        """The sparse block's path in the fused layout, for the DeepSpeed MoE layer at module path ``ffn``."""
        return ffn if self.fused_block is None else _beside(ffn, self.fused_block)

    def router_key(self, ffn: str) -> str:
        return f"{self.fused_block_of(ffn)}.{self.router_name}.weight"

    def score_bias_key(self, ffn: str) -> str:
        """The router's aux-loss-free bias (GLM4-MoE's e_score_correction_bias)."""
        return f"{self.fused_block_of(ffn)}.{self.router_name}.e_score_correction_bias"

    def fused_keys(self, ffn: str) -> tuple[str, str]:
        """(gate_up_proj, down_proj) of the MoE block of the DeepSpeed MoE layer at module path ``ffn``."""
        block = self.fused_block_of(ffn)
        return f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"

    def per_expert_block_of(self, ffn: str) -> str:
        """The sparse block's path in the per-expert layout (Mixtral's sits at block_sparse_moe, beside the FFN)."""
        return _beside(ffn, self.per_expert_block)

    def per_expert_key(self, ffn: str, expert_id: int, which: int) -> str:
        return f"{self.per_expert_block_of(ffn)}.experts.{expert_id}.{self.per_expert_names[which]}.weight"

    # -- DeepSpeed -> HF (export) --------------------------------------------------------------------------------

    def to_hf(self, module_state: dict[str, torch.Tensor], arch: Architecture, layout: MoELayout,
              expert_weights: Callable[[int, int], tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        """The HF class's state from a DeepSpeed model's ``module_state`` (non-expert weights and routers) and
        ``expert_weights(moe_layer_id, global_expert_id)`` -> (gate, up, down) weights."""
        state = {self._hf_name(name): tensor for name, tensor in module_state.items()}
        for moe_layer_id, (block_id, num_experts) in enumerate(zip(layout.blocks, layout.num_experts)):
            ffn = arch.ffn_path(block_id)
            experts = [expert_weights(moe_layer_id, expert_id) for expert_id in range(num_experts)]
            gate_up_key, down_key = self.fused_keys(ffn)
            state[gate_up_key] = torch.stack([torch.cat([e[GATE], e[UP]], dim=0) for e in experts])
            state[down_key] = torch.stack([e[DOWN] for e in experts])
            self.shared_experts_to_hf(state, ffn, _pop_prefixed(state, f"{ffn}.{SHARED_EXPERTS_MODULE}."),
                                      state.pop(f"{ffn}.{SHARED_EXPERT_GATE_WEIGHT}", None))
        return state

    def _hf_name(self, name: str) -> str:
        """A router's names (weight, aux-loss-free bias) in the HF class; every other weight keeps its name."""
        for ours, theirs in ((ROUTER_WEIGHT, self.router_key), (ROUTER_SCORE_BIAS, self.score_bias_key)):
            if name.endswith(ours):
                return theirs(name[:-len(ours) - 1])
        return name

    def shared_experts_to_hf(self, state: dict[str, torch.Tensor], ffn: str, shared: dict[str, torch.Tensor],
                             gate: torch.Tensor | None) -> None:
        """Put the MoE layer at ``ffn``'s shared experts (their weights by name in the FFN, {} without them) and
        gate weight (None without one) into ``state`` under the HF class's names."""
        if shared:
            raise ValueError(f"{self.model_type} has no shared expert (hf/configs.py refuses such an export)")

    # -- HF -> DeepSpeed (import) --------------------------------------------------------------------------------

    def deepspeed_sources(self, arch: Architecture, layout: MoELayout,
                          local_expert_ids: Callable[[int], range]) -> dict[str, Callable]:
        """For each router and expert weight of this rank's DeepSpeed model, under its state-dict name, a reader:
        ``reader -> tensor``. ``local_expert_ids(moe_layer_id)``: the global ids this rank holds, in local order."""
        sources = {}
        for moe_layer_id, block_id in enumerate(layout.blocks):
            ffn = arch.ffn_path(block_id)
            sources[f"{ffn}.{ROUTER_WEIGHT}"] = lambda reader, ffn=ffn: self.read_router(reader, ffn)
            sources.update(self.shared_expert_sources(ffn))
            for local_id, expert_id in enumerate(local_expert_ids(moe_layer_id)):
                for which, projection in enumerate(SWIGLU):
                    sources[expert_weight_key(ffn, local_id, projection)] = (
                        lambda reader, ffn=ffn, e=expert_id, w=which: self.read_expert(reader, ffn, e, w))
        return sources

    def shared_expert_sources(self, ffn: str) -> dict[str, Callable]:
        """Readers of the shared experts' weights whose HF names differ from the DeepSpeed model's (none here)."""
        return {}

    def read_router(self, reader, ffn: str) -> torch.Tensor:
        key = self.router_key(ffn)
        return reader.tensor(key if reader.has(key) else self.router_key(self.per_expert_block_of(ffn)))

    def read_expert(self, reader, ffn: str, expert_id: int, which: int) -> torch.Tensor:
        """One expert's gate, up or down weight; from the fused layout only its slice is read."""
        gate_up_key, down_key = self.fused_keys(ffn)
        if not reader.has(gate_up_key):
            return reader.tensor(self.per_expert_key(ffn, expert_id, which))
        if which == DOWN:
            return reader.slice(down_key)[expert_id]
        gate_up = reader.slice(gate_up_key)
        half = gate_up.get_shape()[1] // 2
        return gate_up[expert_id, :half] if which == GATE else gate_up[expert_id, half:]


class Qwen2MoeAdapter(MoEFamilyAdapter):
    """Qwen2-MoE always builds a shared expert and its gate and always applies sigmoid(shared_expert_gate(x)).

    Without shared experts it gets one with no units (its output is exactly zero). Shared experts without a gate get
    a zero gate, whose sigmoid halves every token's output, and a doubled down projection: both factors are powers of
    two, so the product is exactly the ungated output.
    """

    def shared_experts_to_hf(self, state: dict[str, torch.Tensor], ffn: str, shared: dict[str, torch.Tensor],
                             gate: torch.Tensor | None) -> None:
        like = state[self.fused_keys(ffn)[1]]  # the experts' down_proj, [E, D, F]: their dtype and D
        hidden_size = like.shape[1]
        if not shared:
            shared = _empty_mlp(like)
        elif gate is None:
            shared = {**shared, "down_proj.weight": 2 * shared["down_proj.weight"]}
        state.update({f"{ffn}.shared_expert.{name}": tensor for name, tensor in shared.items()})
        state[f"{ffn}.shared_expert_gate.weight"] = gate if gate is not None else like.new_zeros(1, hidden_size)

    def shared_expert_sources(self, ffn: str) -> dict[str, Callable]:
        """``shared_expert.*`` -> ``shared_experts.*`` (the gate has the same name in both models)."""
        return {f"{ffn}.{SHARED_EXPERTS_MODULE}.{name}.weight":
                lambda reader, key=f"{ffn}.shared_expert.{name}.weight": reader.tensor(key) for name in SWIGLU}


class GraniteMoeSharedAdapter(MoEFamilyAdapter):
    """GraniteMoeShared's ``shared_mlp`` sits in the decoder block, beside its ``block_sparse_moe``: input_linear
    [2 N F, D] = [gate_proj; up_proj], output_linear = down_proj. It has no gate."""

    def shared_experts_to_hf(self, state: dict[str, torch.Tensor], ffn: str, shared: dict[str, torch.Tensor],
                             gate: torch.Tensor | None) -> None:
        if gate is not None:
            raise ValueError("GraniteMoeShared's shared MLP has no gate (hf/configs.py refuses such an export)")
        mlp = _beside(ffn, "shared_mlp")
        gate_proj, up_proj, down_proj = (shared[f"{name}.weight"] for name in SWIGLU)
        state[f"{mlp}.input_linear.weight"] = torch.cat([gate_proj, up_proj], dim=0)
        state[f"{mlp}.output_linear.weight"] = down_proj


class Glm4MoeAdapter(MoEFamilyAdapter):
    """GLM4-MoE: DeepSeek-V3's router (sigmoid scores; ``e_score_correction_bias``, zero when the run had no
    aux-loss-free bias) and an ungated ``shared_experts`` MLP in the sparse block, always built: without shared
    experts it gets one with no units (its output is exactly zero)."""

    def to_hf(self, module_state: dict[str, torch.Tensor], arch: Architecture, layout: MoELayout,
              expert_weights: Callable[[int, int], tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        state = super().to_hf(module_state, arch, layout, expert_weights)
        for block_id, num_experts in zip(layout.blocks, layout.num_experts):
            state.setdefault(self.score_bias_key(arch.ffn_path(block_id)), torch.zeros(num_experts))
        return state

    def shared_experts_to_hf(self, state: dict[str, torch.Tensor], ffn: str, shared: dict[str, torch.Tensor],
                             gate: torch.Tensor | None) -> None:
        if gate is not None:
            raise ValueError("GLM4-MoE's shared experts have no gate (hf/configs.py refuses such an export)")
        shared = shared or _empty_mlp(state[self.fused_keys(ffn)[1]])
        state.update({f"{ffn}.shared_experts.{name}": tensor for name, tensor in shared.items()})


def _empty_mlp(like: torch.Tensor) -> dict[str, torch.Tensor]:
    """A SwiGLU MLP with no units, in the dtype of ``like`` (an experts' down_proj, [E, D, F]): three tensors of
    their own, since safetensors refuses tensors that share memory."""
    hidden_size = like.shape[1]
    return {"gate_proj.weight": like.new_zeros(0, hidden_size), "up_proj.weight": like.new_zeros(0, hidden_size),
            "down_proj.weight": like.new_zeros(hidden_size, 0)}


def _beside(path: str, name: str) -> str:
    """The module ``name`` in the same parent module as the one at ``path``."""
    return f"{path.rsplit('.', 1)[0]}.{name}"


def _pop_prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove the entries whose names start with ``prefix`` from ``state``; return them without it."""
    return {key[len(prefix):]: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}


# Mixtral's attention is Mistral's (same projections, no biases, same sliding_window); Llama has no sliding window,
# so a Mixtral imports as Mistral.
ADAPTERS: dict[str, MoEFamilyAdapter] = {a.model_type: a for a in (
    MoEFamilyAdapter("mixtral", "mistral", per_expert_block="block_sparse_moe", per_expert_names=("w1", "w3", "w2")),
    Qwen2MoeAdapter("qwen2_moe", "qwen2", per_expert_block="mlp", per_expert_names=SWIGLU),
    MoEFamilyAdapter("qwen3_moe", "qwen3", per_expert_block="mlp", per_expert_names=SWIGLU),
)}
# What export writes: those, GraniteMoeShared for Llama and Mistral with shared experts (Mixtral has none) and GLM4-MoE
# for sigmoid routing, which are not imported (hf/configs.py).
EXPORT_ADAPTERS: dict[str, MoEFamilyAdapter] = {
    **ADAPTERS, "granitemoeshared": GraniteMoeSharedAdapter("granitemoeshared", "llama", fused_block="block_sparse_moe",
                                                            router_name="router"),
    "glm4_moe": Glm4MoeAdapter("glm4_moe", "llama")}
