"""One adapter per native transformers MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM4-MoE): its weights' names,
both ways (GLM4-MoE: export only).

An adapter turns a DeepSpeed MoE model's state (the stock layer's names, moe/layer.py) into the HF class's
state (export), and reads the HF class's checkpoint back for any DeepSpeed parameter (import). The other
weights (embeddings, attention, norms, dense FFNs) keep their names in both models.

On disk, HF experts come in one of two layouts. transformers 5 holds them fused: ``experts.gate_up_proj``
[E, 2F, D] (gate rows first, as the forward's ``chunk(2)`` reads them) and ``experts.down_proj`` [E, D, F]. But
save_pretrained writes, and the hub holds, one tensor per expert under each family's original names, which
transformers' conversion_mapping.py fuses inside from_pretrained. Export writes the fused layout; import reads
both, itself, because from_pretrained has no way to load only some experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.architectures import SWIGLU, Architecture
from ..moe.layer import ROUTER_SCORE_BIAS, ROUTER_WEIGHT, expert_weight_key
from ..moe.layout import MoELayout

GATE, UP, DOWN = range(3)  # index of a projection in a (gate, up, down) triple


@dataclass(frozen=True)
class MoEFamilyAdapter:
    model_type: str             # the transformers MoE config's model_type
    # the dense family an HF MoE checkpoint is imported as: the one whose attention, norms and embeddings are the
    # MoE class's own
    dense_model_type: str
    per_expert_block: str       # the sparse block's attribute in a decoder block, in the per-expert layout
    per_expert_names: tuple[str, str, str]  # (gate, up, down) weight names of one expert, in that layout
    empty_shared_expert: bool = False       # the class always builds a shared expert: export writes an empty one
    shared_expert_module: str = "shared_expert"  # ... under this name in the sparse block
    shared_expert_gate: bool = True              # ... with a sigmoid gate beside it
    score_correction_bias: bool = False     # the router has an aux-loss-free bias (e_score_correction_bias)

    # -- names --------------------------------------------------------------------------------------------------

    @staticmethod
    def router_key(ffn: str) -> str:
        return f"{ffn}.gate.weight"

    @staticmethod
    def score_bias_key(ffn: str) -> str:
        return f"{ffn}.gate.e_score_correction_bias"

    @staticmethod
    def fused_keys(ffn: str) -> tuple[str, str]:
        """(gate_up_proj, down_proj) of the MoE block at module path ``ffn``."""
        return f"{ffn}.experts.gate_up_proj", f"{ffn}.experts.down_proj"

    def per_expert_block_of(self, ffn: str) -> str:
        """The sparse block's path in the per-expert layout (Mixtral's sits at block_sparse_moe, beside the FFN)."""
        return f"{ffn.rsplit('.', 1)[0]}.{self.per_expert_block}"

    def per_expert_key(self, ffn: str, expert_id: int, which: int) -> str:
        return f"{self.per_expert_block_of(ffn)}.experts.{expert_id}.{self.per_expert_names[which]}.weight"

    # -- DeepSpeed -> HF (export) --------------------------------------------------------------------------------

    def to_hf(self, module_state: dict[str, torch.Tensor], arch: Architecture, layout: MoELayout, hidden_size: int,
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
            if self.score_correction_bias:  # zero when the run had no aux-loss-free bias
                state.setdefault(self.score_bias_key(ffn), torch.zeros(num_experts, dtype=torch.float32))
            if self.empty_shared_expert:
                dtype = state[down_key].dtype
                state.update({f"{ffn}.{name}": t for name, t in _empty_shared_expert(
                    hidden_size, dtype, self.shared_expert_module, self.shared_expert_gate).items()})
        return state

    def _hf_name(self, name: str) -> str:
        """A router's names (weight, aux-loss-free bias) in the HF class; every other weight keeps its name."""
        for ours, theirs in ((ROUTER_WEIGHT, self.router_key), (ROUTER_SCORE_BIAS, self.score_bias_key)):
            if name.endswith(ours):
                return theirs(name[:-len(ours) - 1])
        return name

    # -- HF -> DeepSpeed (import) --------------------------------------------------------------------------------

    def deepspeed_sources(self, arch: Architecture, layout: MoELayout,
                          local_expert_ids: Callable[[int], range]) -> dict[str, Callable]:
        """For each router and expert weight of this rank's DeepSpeed model, under its state-dict name, a reader:
        ``reader -> tensor``. ``local_expert_ids(moe_layer_id)``: the global ids this rank holds, in local order."""
        sources = {}
        for moe_layer_id, block_id in enumerate(layout.blocks):
            ffn = arch.ffn_path(block_id)
            sources[f"{ffn}.{ROUTER_WEIGHT}"] = lambda reader, ffn=ffn: self.read_router(reader, ffn)
            for local_id, expert_id in enumerate(local_expert_ids(moe_layer_id)):
                for which, projection in enumerate(SWIGLU):
                    sources[expert_weight_key(ffn, local_id, projection)] = (
                        lambda reader, ffn=ffn, e=expert_id, w=which: self.read_expert(reader, ffn, e, w))
        return sources

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


def _empty_shared_expert(hidden_size: int, dtype: torch.dtype, module: str, gate: bool) -> dict[str, torch.Tensor]:
    """A shared expert with no intermediate units (its output is exactly zero), relative to the sparse block: Qwen2-MoE's
    ``shared_expert`` (with its gate), GLM4-MoE's ``shared_experts``."""
    weights = {f"{module}.gate_proj.weight": torch.zeros(0, hidden_size, dtype=dtype),
               f"{module}.up_proj.weight": torch.zeros(0, hidden_size, dtype=dtype),
               f"{module}.down_proj.weight": torch.zeros(hidden_size, 0, dtype=dtype)}
    return {**weights, f"{module}_gate.weight": torch.zeros(1, hidden_size, dtype=dtype)} if gate else weights


# Mixtral's attention is Mistral's (same projections, no biases, same sliding_window); Llama has no sliding window,
# so a Mixtral imports as Mistral.
ADAPTERS: dict[str, MoEFamilyAdapter] = {a.model_type: a for a in (
    MoEFamilyAdapter("mixtral", "mistral", per_expert_block="block_sparse_moe", per_expert_names=("w1", "w3", "w2")),
    MoEFamilyAdapter("qwen2_moe", "qwen2", per_expert_block="mlp", per_expert_names=SWIGLU, empty_shared_expert=True),
    MoEFamilyAdapter("qwen3_moe", "qwen3", per_expert_block="mlp", per_expert_names=SWIGLU),
    # GLM4-MoE: DeepSeek-V3's sigmoid routing with Llama-style attention (optional q/k norms); export only
    MoEFamilyAdapter("glm4_moe", "", per_expert_block="mlp", per_expert_names=SWIGLU, empty_shared_expert=True,
                     shared_expert_module="shared_experts", shared_expert_gate=False, score_correction_bias=True),
)}
