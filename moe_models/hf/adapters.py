"""One adapter per native transformers MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoe, GraniteMoeShared,
GraniteMoe-SWA, FlexOlmo, HunYuan-MoE, ERNIE-4.5-MoE, GLM4-MoE, Cohere2-MoE): its weights' names, both ways.

An adapter turns a DeepSpeed MoE model's state (the stock layer's names, moe/layer.py) into the HF class's
state (export), and reads the HF class's checkpoint back for any DeepSpeed parameter (import). The other
weights (embeddings, attention, norms, dense FFNs) keep their names in both models.

On disk, HF experts come in one of three layouts. transformers 5 holds them fused: ``experts.gate_up_proj``
[E, 2F, D] (gate rows first, as the forward's ``chunk(2)`` reads them) and ``experts.down_proj`` [E, D, F]. But
save_pretrained writes, and the hub holds, each family's original names, which transformers' conversion_mapping.py
renames inside from_pretrained: one tensor per expert for most, the same fused tensors under other names for
GraniteMoe (``input_linear``, ``output_linear``). Export writes the fused layout; import reads all three, itself,
because from_pretrained has no way to load only some experts.

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
from ..moe.layer import (ROUTER_SCORE_BIAS, ROUTER_WEIGHT, SHARED_EXPERT_GATE_WEIGHT, SHARED_EXPERTS_MODULE,
                         expert_weight_key)
from ..run.moe_layout import MoELayout

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
        if gate is not None or (shared and self.shared_name is None):
            raise ValueError(f"{self.model_type} cannot hold these shared experts (hf/configs.py refuses such an "
                             "export)")
        if shared or self.always_shared:
            shared = shared or _empty_mlp(state[self.fused_keys(ffn)[1]])
            state.update({f"{ffn}.{self.shared_name}.{name}": tensor for name, tensor in shared.items()})

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
        """Readers of the shared experts' weights whose HF names differ from the DeepSpeed model's."""
        if self.shared_name in (None, SHARED_EXPERTS_MODULE):
            return {}
        return {f"{ffn}.{SHARED_EXPERTS_MODULE}.{name}.weight":
                lambda reader, key=f"{ffn}.{self.shared_name}.{name}.weight": reader.tensor(key) for name in SWIGLU}

    def read_router(self, reader, ffn: str) -> torch.Tensor:
        key = self.router_key(ffn)
        return reader.tensor(key if reader.has(key) else self.router_key(self.per_expert_block_of(ffn)))

    def read_score_bias(self, reader, ffn: str) -> torch.Tensor | None:
        """The router's bias ([E]) of the MoE layer at ``ffn``; None for a class whose router has none."""
        return None

    def fused_keys_on_disk(self, reader, ffn: str) -> tuple[str, str] | None:
        """(gate_up, down) names of the fused experts of the MoE layer at ``ffn`` in ``reader``'s checkpoint; None
        when it holds one tensor per expert."""
        keys = self.fused_keys(ffn)
        return keys if reader.has(keys[0]) else None

    def read_expert(self, reader, ffn: str, expert_id: int, which: int) -> torch.Tensor:
        """One expert's gate, up or down weight; from the fused layout only its slice is read."""
        fused = self.fused_keys_on_disk(reader, ffn)
        if fused is None:
            return reader.tensor(self.per_expert_key(ffn, expert_id, which))
        gate_up_key, down_key = fused
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
        state.update({f"{ffn}.{self.shared_name}.{name}": tensor for name, tensor in shared.items()})
        # the gate has the same name in both models
        state[f"{ffn}.{SHARED_EXPERT_GATE_WEIGHT}"] = gate if gate is not None else like.new_zeros(1, hidden_size)


class GraniteMoeAdapter(MoEFamilyAdapter):
    """GraniteMoe's sparse block sits beside the FFN (``block_sparse_moe``, its router ``router``). save_pretrained
    writes the experts fused under their original names, ``input_linear`` [E, 2F, D] (gate rows first) and
    ``output_linear`` [E, D, F], and the router as ``router.layer``."""

    def read_router(self, reader, ffn: str) -> torch.Tensor:
        key = self.router_key(ffn)
        return reader.tensor(key if reader.has(key) else f"{self.fused_block_of(ffn)}.router.layer.weight")

    def fused_keys_on_disk(self, reader, ffn: str) -> tuple[str, str] | None:
        block = self.fused_block_of(ffn)
        original = f"{block}.input_linear.weight", f"{block}.output_linear.weight"
        return original if reader.has(original[0]) else super().fused_keys_on_disk(reader, ffn)


class GraniteMoeSharedAdapter(GraniteMoeAdapter):
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

    def shared_expert_sources(self, ffn: str) -> dict[str, Callable]:
        mlp = _beside(ffn, "shared_mlp")

        def input_half(reader, which: int) -> torch.Tensor:
            gate_up = reader.slice(f"{mlp}.input_linear.weight")
            half = gate_up.get_shape()[0] // 2
            return gate_up[:half] if which == GATE else gate_up[half:]

        key = f"{ffn}.{SHARED_EXPERTS_MODULE}"
        return {f"{key}.{SWIGLU[GATE]}.weight": lambda reader: input_half(reader, GATE),
                f"{key}.{SWIGLU[UP]}.weight": lambda reader: input_half(reader, UP),
                f"{key}.{SWIGLU[DOWN]}.weight": lambda reader: reader.tensor(f"{mlp}.output_linear.weight")}


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

    def read_score_bias(self, reader, ffn: str) -> torch.Tensor:
        """Under the class's name, or where save_pretrained writes ERNIE-4.5-MoE's (``<ffn>.moe_statics.*``)."""
        key = self.score_bias_key(ffn)
        return reader.tensor(key if reader.has(key) else f"{ffn}.{self.score_bias_name}").reshape(-1)


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


# Each class imports as the dense family whose attention, norms and embeddings are its own. Mixtral's attention is
# Mistral's (same projections, no biases, same sliding_window); Llama has no sliding window, so a Mixtral imports as
# Mistral. GraniteMoe(Shared) imports as Granite, also when a Llama run exported it (its scalings set to 1.0).
# GLM4-MoE imports as Llama, Qwen2 or Qwen3, as its settings say (hf/import_config.py: import_dense_model_type).
ADAPTERS: dict[str, MoEFamilyAdapter] = {a.model_type: a for a in (
    MoEFamilyAdapter("mixtral", "mistral", per_expert_block="block_sparse_moe", per_expert_names=("w1", "w3", "w2")),
    Qwen2MoeAdapter("qwen2_moe", "qwen2", per_expert_block="mlp", per_expert_names=SWIGLU,
                    shared_name="shared_expert"),
    MoEFamilyAdapter("qwen3_moe", "qwen3", per_expert_block="mlp", per_expert_names=SWIGLU),
    GraniteMoeAdapter("granitemoe", "granite", fused_block="block_sparse_moe", router_name="router"),
    GraniteMoeSharedAdapter("granitemoeshared", "granite", fused_block="block_sparse_moe", router_name="router"),
    GraniteMoeSharedAdapter("granitemoe_swa", "granite_swa", fused_block="block_sparse_moe", router_name="router"),
    MoEFamilyAdapter("flex_olmo", "olmo2", per_expert_block="mlp", per_expert_names=SWIGLU),
    MoEFamilyAdapter("hunyuan_v1_moe", "hunyuan_v1_dense", per_expert_block="mlp", per_expert_names=SWIGLU,
                     router_name="gate.wg", shared_name="shared_mlp"),
    Ernie4_5MoeAdapter("ernie4_5_moe", "ernie4_5", per_expert_block="mlp", per_expert_names=SWIGLU,
                       shared_name=SHARED_EXPERTS_MODULE, score_bias_name="moe_statics.e_score_correction_bias"),
    BiasedRouterAdapter("glm4_moe", "llama", per_expert_block="mlp", per_expert_names=SWIGLU,
                        shared_name=SHARED_EXPERTS_MODULE, always_shared=True),
    MoEFamilyAdapter("cohere2_moe", "cohere2", per_expert_block="mlp", per_expert_names=SWIGLU,
                     shared_name=SHARED_EXPERTS_MODULE),
)}
