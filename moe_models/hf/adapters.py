"""One adapter per native transformers MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoe, GraniteMoeShared,
GraniteMoe-SWA, FlexOlmo, HunYuan-MoE, ERNIE-4.5-MoE, GLM4-MoE, Cohere2-MoE) that a dense-to-MoE run exports to:
the class's names for the DeepSpeed MoE model's weights.

An adapter turns a DeepSpeed MoE model's state (the stock layer's names, moe/layer.py) into the HF class's state.
The other weights (embeddings, attention, norms, dense FFNs) keep their names in both models. The experts are
written in transformers 5's fused layout, ``experts.gate_up_proj`` [E, 2F, D] (gate rows first, as the forward's
``chunk(2)`` reads them) and ``experts.down_proj`` [E, D, F]; save_pretrained (hf/exporter.py) then writes the hub's
layout of the class. The way back is no adapter's: an exported folder, as any folder of an HF MoE class, is
continued in place (hf/in_place_run.py).

Shared experts (``<ffn>.shared_experts.{gate,up,down}_proj`` and ``<ffn>.shared_expert_gate``, moe/shared.py) are
Qwen2-MoE's ``shared_expert`` and ``shared_expert_gate``, GLM4-MoE's, ERNIE-4.5-MoE's and Cohere2-MoE's
``shared_experts``, HunYuan-MoE's ``shared_mlp``, and GraniteMoeShared's and GraniteMoe-SWA's ``shared_mlp`` beside
the sparse block (gate and up rows fused as ``input_linear``, gate rows first); all but Qwen2-MoE's have no gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.architectures import SWIGLU, Architecture
from ..moe.layer import ROUTER_SCORE_BIAS, ROUTER_WEIGHT, SHARED_EXPERT_GATE_WEIGHT, SHARED_EXPERTS_MODULE
from ..run.moe_layout import MoELayout

GATE, UP, DOWN = range(3)  # index of a projection in a (gate, up, down) triple


@dataclass(frozen=True)
class MoEFamilyAdapter:
    model_type: str             # the transformers MoE config's model_type
    # the sparse block's attribute in a decoder block in the fused layout when it is not the FFN's (Granite's sits at
    # block_sparse_moe), and the name of its router there
    fused_block: str | None = None
    router_name: str = "gate"
    # the router's aux-loss-free bias, beside its weight (GLM4-MoE's and ERNIE-4.5-MoE's e_score_correction_bias)
    score_bias_name: str = "e_score_correction_bias"
    # the shared experts' module in the sparse block, with SWIGLU's projection names (None: the class has none, or
    # its adapter writes them itself); always_shared: the class always builds it, so a run without shared experts
    # gets an MLP with no units, which adds exactly zero
    shared_name: str | None = None
    always_shared: bool = False

    # -- names --------------------------------------------------------------------------------------------------

    def fused_block_of(self, ffn: str) -> str:
        """The sparse block's path in the fused layout, for the DeepSpeed MoE layer at module path ``ffn``."""
        return ffn if self.fused_block is None else _beside(ffn, self.fused_block)

    def router_key(self, ffn: str) -> str:
        return f"{self.fused_block_of(ffn)}.{self.router_name}.weight"

    def score_bias_key(self, ffn: str) -> str:
        """The router's aux-loss-free bias (GLM4-MoE's, ERNIE-4.5-MoE's e_score_correction_bias)."""
        return f"{self.fused_block_of(ffn)}.{self.router_name}.{self.score_bias_name}"

    def fused_keys(self, ffn: str) -> tuple[str, str]:
        """(gate_up_proj, down_proj) of the MoE block of the DeepSpeed MoE layer at module path ``ffn``."""
        block = self.fused_block_of(ffn)
        return f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"

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
        if gate is not None or (shared and self.shared_name is None):
            raise ValueError(f"{self.model_type} cannot hold these shared experts (hf/configs.py refuses such an "
                             "export)")
        if shared or self.always_shared:
            shared = shared or _empty_mlp(state[self.fused_keys(ffn)[1]])
            state.update({f"{ffn}.{self.shared_name}.{name}": tensor for name, tensor in shared.items()})

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
        state.update({f"{ffn}.{self.shared_name}.{name}": tensor for name, tensor in shared.items()})
        # the gate has the same name in both models
        state[f"{ffn}.{SHARED_EXPERT_GATE_WEIGHT}"] = gate if gate is not None else like.new_zeros(1, hidden_size)


class GraniteMoeSharedAdapter(MoEFamilyAdapter):
    """GraniteMoeShared's ``shared_mlp`` sits in the decoder block, beside its ``block_sparse_moe``: input_linear
    [2 N F, D] = [gate_proj; up_proj], output_linear = down_proj. It has no gate."""

    def shared_experts_to_hf(self, state: dict[str, torch.Tensor], ffn: str, shared: dict[str, torch.Tensor],
                             gate: torch.Tensor | None) -> None:
        if gate is not None:
            raise ValueError("GraniteMoeShared's shared MLP has no gate (hf/configs.py refuses such an export)")
        if not shared:
            return  # shared_intermediate_size 0: no shared_mlp
        mlp = _beside(ffn, "shared_mlp")
        gate_proj, up_proj, down_proj = (shared[f"{name}.weight"] for name in SWIGLU)
        state[f"{mlp}.input_linear.weight"] = torch.cat([gate_proj, up_proj], dim=0)
        state[f"{mlp}.output_linear.weight"] = down_proj

class BiasedRouterAdapter(MoEFamilyAdapter):
    """A class whose router always holds an aux-loss-free bias beside its weight (GLM4-MoE's DeepSeek-V3 router,
    ERNIE-4.5-MoE's ``moe_statics``): zeros when the run had none."""

    def to_hf(self, module_state: dict[str, torch.Tensor], arch: Architecture, layout: MoELayout,
              expert_weights: Callable[[int, int], tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        state = super().to_hf(module_state, arch, layout, expert_weights)
        for block_id, num_experts in zip(layout.blocks, layout.num_experts):
            key = self.score_bias_key(arch.ffn_path(block_id))
            state[key] = state.get(key, torch.zeros(num_experts)).reshape(self.score_bias_shape(num_experts))
        return state

    def score_bias_shape(self, num_experts: int) -> tuple[int, ...]:
        return (num_experts,)

class Ernie4_5MoeAdapter(BiasedRouterAdapter):
    """ERNIE-4.5-MoE keeps its router's bias as one row, [1, E], in ``gate.moe_statics``."""

    def score_bias_shape(self, num_experts: int) -> tuple[int, ...]:
        return (1, num_experts)


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


# Each class's names where they are not the defaults: Granite's sparse block beside the FFN, its router and shared
# MLP; the shared experts' module; the routers whose bias is held under another name.
ADAPTERS: dict[str, MoEFamilyAdapter] = {a.model_type: a for a in (
    MoEFamilyAdapter("mixtral"),
    Qwen2MoeAdapter("qwen2_moe", shared_name="shared_expert"),
    MoEFamilyAdapter("qwen3_moe"),
    MoEFamilyAdapter("granitemoe", fused_block="block_sparse_moe", router_name="router"),
    GraniteMoeSharedAdapter("granitemoeshared", fused_block="block_sparse_moe", router_name="router"),
    GraniteMoeSharedAdapter("granitemoe_swa", fused_block="block_sparse_moe", router_name="router"),
    MoEFamilyAdapter("flex_olmo"),
    MoEFamilyAdapter("hunyuan_v1_moe", router_name="gate.wg", shared_name="shared_mlp"),
    Ernie4_5MoeAdapter("ernie4_5_moe", shared_name=SHARED_EXPERTS_MODULE,
                       score_bias_name="moe_statics.e_score_correction_bias"),
    BiasedRouterAdapter("glm4_moe", shared_name=SHARED_EXPERTS_MODULE, always_shared=True),
    MoEFamilyAdapter("cohere2_moe", shared_name=SHARED_EXPERTS_MODULE),
)}
