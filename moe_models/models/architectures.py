"""Per model family: where the transformer blocks and their FFN live. (Which native HF MoE class a family exports to
is hf/configs.py's concern.)

Surgery finds FFNs through this table when the family is listed, and otherwise by inspecting the model's blocks
(models/discovery.py); either way it proves the conversion on a probe model before converting (moe/proof.py). A
family whose FFN is a module taking and returning one hidden-states tensor, but which inspection gets wrong, is one
more entry here (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .discovery import find_ffn

# The (gate, up, down) projection names of the SwiGLU FFN of Llama, Mistral and Qwen, which every HF MoE class this
# project exports to keeps inside its experts too.
SWIGLU = ("gate_proj", "up_proj", "down_proj")

# The same FFN as (the projections into its hidden units, the one out of them).
SWIGLU_FFN_PROJECTIONS = ((SWIGLU[0], SWIGLU[1]), SWIGLU[2])


@dataclass(frozen=True)
class Architecture:
    model_type: str          # transformers' config.model_type
    blocks: str              # dotted path from the causal LM to its nn.ModuleList of blocks
    ffn: str                 # attribute of one block that holds its FFN
    # (the projections into the FFN's hidden units, the one out of them; by default SwiGLU's): where each hidden
    # unit's weights sit, for the shared experts' widening (moe/shared.py), the upcycled output scaling
    # (moe/surgery.py), --expert_init granular and drop (moe/upcycling.py) and the grouped experts (moe/ffn_form.py)
    ffn_projections: tuple[tuple[str, ...], str] = SWIGLU_FFN_PROJECTIONS
    discovered: bool = False  # found by inspecting the model (models/discovery.py), not listed in the table

    def ffn_path(self, block_id: int) -> str:
        """The module path, from the causal LM, of block ``block_id``'s FFN (an MoE layer after surgery)."""
        return f"{self.blocks}.{block_id}.{self.ffn}"

    def blocks_of(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for name in self.blocks.split("."):
            module = getattr(module, name)
        return module


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", blocks="model.layers", ffn="mlp"),
    Architecture("mistral", blocks="model.layers", ffn="mlp"),
    Architecture("qwen2", blocks="model.layers", ffn="mlp"),
    Architecture("qwen3", blocks="model.layers", ffn="mlp"),
    Architecture("granite", blocks="model.layers", ffn="mlp"),
    Architecture("olmo2", blocks="model.layers", ffn="mlp"),
    Architecture("hunyuan_v1_dense", blocks="model.layers", ffn="mlp"),
    Architecture("ernie4_5", blocks="model.layers", ffn="mlp"),
    Architecture("cohere2", blocks="model.layers", ffn="mlp"),
    Architecture("granite_swa", blocks="model.layers", ffn="mlp"),
    # transformers has no GPT-2 MoE class; c_fc/c_proj are Conv1D with biases and GELU, so no grouped GEMM
    Architecture("gpt2", blocks="transformer.h", ffn="mlp", ffn_projections=(("c_fc",), "c_proj")),
)}


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry for a transformers model, or what inspecting its blocks finds; a ValueError saying what was
    found when neither gives a block FFN."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return discovered_architecture(model)


def architecture_of_config(config) -> Architecture:
    """The architecture of a transformers config (a model's ``config``, or a saved run's base model config): what
    code that holds a config but no model (export, import) uses. For a family not in the table the model is built on
    the meta device (no memory, no random draws) and inspected, once per config."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type is None:
        raise ValueError(f"{config!r} is not a transformers config (it has no model_type)")
    key = config.to_json_string(use_diff=False)
    if key not in _DISCOVERED:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _DISCOVERED[key] = discovered_architecture(model)
    return _DISCOVERED[key]


_DISCOVERED: dict[str, Architecture] = {}  # config (as JSON) -> its discovered architecture


def discovered_architecture(model: nn.Module) -> Architecture:
    """The Architecture of a model that inspection finds (models/discovery.py); a ValueError otherwise."""
    found = find_ffn(model)
    return Architecture(model.config.model_type, blocks=found.blocks, ffn=found.ffn,
                        ffn_projections=(found.inputs, found.output), discovered=True)
