"""Per model family: where the transformer blocks and their FFN live. (Which native HF MoE class a family exports to
is hf/configs.py's concern.)

Surgery finds FFNs through this table, never by guessing module names. A family whose FFN is a
module taking and returning one hidden-states tensor is one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    # (gate, up, down) Linear attributes of a SwiGLU-style FFN, down(act_fn(gate(x)) * up(x)): what lets
    # --moe_impl grouped run all experts as grouped GEMMs. None: its experts run one after the other.
    gated_projections: tuple[str, str, str] | None = None
    # (the projections into the FFN's hidden units, the one out of them; by default SwiGLU's): where each hidden
    # unit's weights sit, for the shared experts' widening (moe/shared.py), the upcycled output scaling
    # (moe/surgery.py) and --expert_init granular and drop (moe/upcycling.py)
    ffn_projections: tuple[tuple[str, ...], str] = SWIGLU_FFN_PROJECTIONS

    def ffn_path(self, block_id: int) -> str:
        """The module path, from the causal LM, of block ``block_id``'s FFN (an MoE layer after surgery)."""
        return f"{self.blocks}.{block_id}.{self.ffn}"

    def blocks_of(self, model: nn.Module) -> nn.ModuleList:
        module = model
        for name in self.blocks.split("."):
            module = getattr(module, name)
        return module


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("mistral", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("qwen2", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("qwen3", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("granite", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("olmo2", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("hunyuan_v1_dense", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("ernie4_5", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("cohere2", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    Architecture("granite_swa", blocks="model.layers", ffn="mlp", gated_projections=SWIGLU),
    # transformers has no GPT-2 MoE class; c_fc/c_proj are Conv1D with biases and GELU, so no grouped GEMM
    Architecture("gpt2", blocks="transformer.h", ffn="mlp", ffn_projections=(("c_fc",), "c_proj")),
)}


# The model_types of the transformers MoE classes whose checkpoints import (moe_models/hf/load.py; hf/adapters.py has
# one adapter for each): a folder of one of these is an MoE model to continue, not a dense model to upcycle.
IMPORTABLE_MOE_MODEL_TYPES = ("cohere2_moe", "ernie4_5_moe", "flex_olmo", "glm4_moe", "granitemoe", "granitemoe_swa",
                              "granitemoeshared", "hunyuan_v1_moe", "mixtral", "qwen2_moe", "qwen3_moe")


def architecture_of(model: nn.Module) -> Architecture:
    """The table entry for a transformers model; a clear error for families not in the table."""
    return architecture_of_config(getattr(model, "config", None))


def architecture_of_config(config) -> Architecture:
    """The table entry for a transformers config (a model's ``config``, or a saved run's base model config): what
    code that holds a config but no model (export, import) uses. A clear error for families not in the table."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model type {model_type!r} is not supported yet; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}. A family with a standard FFN is one entry in "
                         "moe_models/models/architectures.py:ARCHITECTURES.")
    return ARCHITECTURES[model_type]
