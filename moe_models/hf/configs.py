"""The native transformers MoE class of each family, both ways: its config, and which blocks are sparse.

Llama and Mistral map to Mixtral, Qwen2 to Qwen2-MoE, Qwen3 to Qwen3-MoE (``moe_model_type`` in
moe_models/models/architectures.py; the weights' names: hf/adapters.py). A mapping is made only when the MoE class
computes exactly what the DeepSpeed model computes; anything else raises NotRepresentable with every reason at once.

Routing facts the checks rest on (deepspeed/moe/sharded_moe.py, transformers' */modeling_*_moe.py):
  - DeepSpeed top-1 scales the chosen expert's output by its softmax probability; top-2 and top-k > 2 rescale
    the chosen probabilities to sum to 1.
  - Mixtral always rescales the top-k probabilities to sum to 1 (so top-1 gets weight 1.0).
  - Qwen2-MoE and Qwen3-MoE rescale when ``norm_topk_prob`` is true, and keep the probabilities otherwise.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from ..config import MoEConfig
from ..models.architectures import ARCHITECTURES
from ..moe.layout import MoELayout
from .adapters import ADAPTERS

# Config fields that mean the same in a dense family and its MoE class: embeddings, attention, norms, rope, tokens.
# A field the source config does not have keeps the target class's default.
SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                 "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id", "bos_token_id",
                 "eos_token_id")
SHARED_FIELDS_OF_MOE_TYPE = {
    "mixtral": ("sliding_window",),  # Mistral's and Mixtral's window apply to every block alike
    "qwen2_moe": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
    "qwen3_moe": ("attention_bias",),  # Qwen3-MoE windows every block, Qwen3 only some: sliding is refused
}


class NotRepresentable(ValueError):
    """What a native HF MoE class cannot compute the way the model does, one reason per line."""

    def __init__(self, subject: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{subject} cannot be represented exactly:\n" + "\n".join(f"  - {p}" for p in problems))


def export_problems(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> list[str]:
    """Why the DeepSpeed MoE model built from ``dense`` with ``moe`` (MoE layers as in ``layout``) has no exact native
    HF MoE class (empty: it has)."""
    moe_type = ARCHITECTURES[dense.model_type].moe_model_type
    if moe_type is None:
        return [f"{dense.model_type} has no Mixture-of-Experts class in transformers (Mixtral covers Llama and "
                "Mistral, Qwen2-MoE and Qwen3-MoE cover Qwen2 and Qwen3); keep using the DeepSpeed checkpoint"]
    problems = []
    if layout.uniform_num_experts is None:
        problems.append(f"per-layer expert counts {list(layout.num_experts)}: an HF MoE class has one expert count "
                        "for every MoE block")
    if moe.use_residual:
        problems.append("residual MoE (use_residual): no HF MoE class mixes a dense FFN into the experts' output "
                        "with a learned coefficient")
    if moe_type == "mixtral":
        if moe.top_k == 1:
            problems.append("top_k 1: DeepSpeed scales the chosen expert's output by its router probability, "
                            "Mixtral gives it weight 1.0 (it rescales the top-k probabilities to sum to 1)")
        if len(layout.blocks) < dense.num_hidden_layers:
            problems.append(f"moe_layers {moe.moe_layers!r} keeps dense FFNs in some of the {dense.num_hidden_layers} "
                            "blocks: Mixtral has an MoE FFN in every block (Qwen2-MoE and Qwen3-MoE can mix them)")
        for bias in ("attention_bias", "mlp_bias"):
            if getattr(dense, bias, False):
                problems.append(f"{bias} is true: Mixtral's attention and experts have no biases")
    if moe_type == "qwen3_moe" and "sliding_attention" in (getattr(dense, "layer_types", None) or []):
        problems.append("sliding-window attention in some blocks: Qwen3-MoE applies its window to every block or "
                        "to none")
    return problems


def hf_moe_config(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> PretrainedConfig:
    """The native HF MoE config of the DeepSpeed model built from ``dense`` (its base_model config) with ``moe``."""
    problems = export_problems(dense, moe, layout)
    if problems:
        raise NotRepresentable(f"this {dense.model_type} MoE model", problems)
    moe_type = ARCHITECTURES[dense.model_type].moe_model_type
    num_layers, num_experts = dense.num_hidden_layers, layout.uniform_num_experts
    expert_size = expert_intermediate_size(dense, moe)
    fields = _shared_fields(dense, moe_type)
    if moe_type == "mixtral":  # every block is sparse: intermediate_size is the experts'
        fields.update(num_local_experts=num_experts, num_experts_per_tok=moe.top_k, intermediate_size=expert_size)
    else:  # dense blocks keep the dense FFN's intermediate_size
        fields.update(num_experts=num_experts, num_experts_per_tok=moe.top_k, norm_topk_prob=moe.top_k > 1,
                      moe_intermediate_size=expert_size, intermediate_size=dense.intermediate_size,
                      decoder_sparse_step=1, mlp_only_layers=[i for i in range(num_layers) if i not in layout.blocks])
    if moe_type == "qwen2_moe":
        # Qwen2-MoE always builds a shared expert; with no intermediate units it adds exactly zero (tested).
        fields.update(shared_expert_intermediate_size=0, qkv_bias=True)
    return AutoConfig.for_model(moe_type, **fields)


def expert_intermediate_size(dense: PretrainedConfig, moe: MoEConfig) -> int:
    """An expert's hidden units: the dense FFN's, or 1/granularity of them with --expert_init granular."""
    return dense.intermediate_size // moe.granularity if moe.expert_init == "granular" else dense.intermediate_size


def import_problems(config: PretrainedConfig) -> list[str]:
    """Why an HF MoE checkpoint's model cannot be rebuilt exactly from DeepSpeed MoE layers (empty: it can)."""
    moe_type, top_k = config.model_type, config.num_experts_per_tok
    problems = []
    if moe_type == "mixtral" and top_k == 1:
        problems.append("num_experts_per_tok 1: Mixtral gives the chosen expert weight 1.0, DeepSpeed's top-1 "
                        "scales it by its router probability")
    if moe_type in ("qwen2_moe", "qwen3_moe"):
        if config.norm_topk_prob != (top_k > 1):
            problems.append(f"norm_topk_prob {config.norm_topk_prob} with num_experts_per_tok {top_k}: DeepSpeed "
                            + ("keeps the top-1 probability as the weight" if top_k == 1 else
                               "rescales the top-k probabilities to sum to 1"))
        block_ids = _qwen_moe_block_ids(config)
        if not block_ids:
            problems.append("no block has an MoE FFN (mlp_only_layers / decoder_sparse_step); load it as a dense "
                            "model instead")
        if 0 < len(block_ids) < config.num_hidden_layers and _granularity_beside_dense_blocks(config) is None:
            problems.append(f"dense blocks of intermediate_size {config.intermediate_size} beside experts of "
                            f"moe_intermediate_size {config.moe_intermediate_size}: DeepSpeed's experts are copies "
                            "of the dense FFN or, as --expert_init granular makes them, 1/G of it with num_experts "
                            f"({config.num_experts}) a multiple of G; no whole G gives these sizes")
    if moe_type == "qwen2_moe":
        if config.shared_expert_intermediate_size > 0:
            problems.append(f"a shared expert (shared_expert_intermediate_size {config.shared_expert_intermediate_size})"
                            ": a DeepSpeed MoE layer has no always-on expert beside the routed ones")
        if not config.qkv_bias:
            problems.append("qkv_bias is false: Qwen2's attention always has query/key/value biases")
    if moe_type == "qwen3_moe" and config.use_sliding_window:
        problems.append("use_sliding_window is true: Qwen3 windows only blocks from max_window_layers on, "
                        "Qwen3-MoE windows every block")
    return problems


def dense_config_and_moe_settings(config: PretrainedConfig) -> tuple[PretrainedConfig, dict, MoELayout]:
    """From an HF MoE config: the dense config to build and convert, the MoE settings (num_experts, top_k,
    moe_layers; expert_init granular and its granularity when dense blocks are wider than the experts) that
    rebuild the checkpoint's model, and its MoE layout."""
    problems = import_problems(config)
    if problems:
        raise NotRepresentable(f"the {config.model_type} checkpoint", problems)
    moe_type, num_layers = config.model_type, config.num_hidden_layers
    if moe_type == "mixtral":
        num_experts, ffn_size, block_ids = config.num_local_experts, config.intermediate_size, list(range(num_layers))
    else:
        num_experts, ffn_size, block_ids = config.num_experts, config.moe_intermediate_size, _qwen_moe_block_ids(config)
    moe_layers = "all" if len(block_ids) == num_layers else block_ids
    settings = {"num_experts": num_experts, "top_k": config.num_experts_per_tok, "moe_layers": moe_layers}
    granularity = _granularity_beside_dense_blocks(config) if moe_layers != "all" else 1
    if granularity > 1:  # dense blocks of the full width beside fine-grained experts: granular experts rebuild them
        ffn_size = config.intermediate_size
        settings.update(expert_init="granular", granularity=granularity)
    fields = _shared_fields(config, moe_type)
    dense = AutoConfig.for_model(ADAPTERS[moe_type].dense_model_type, intermediate_size=ffn_size, **fields)
    return dense, settings, MoELayout(tuple(block_ids), (num_experts,) * len(block_ids))


def _granularity_beside_dense_blocks(config: PretrainedConfig) -> int | None:
    """G such that a Qwen MoE checkpoint's dense blocks (intermediate_size F) and experts (moe_intermediate_size
    F/G) are the model --expert_init granular --granularity G builds; None when there is no such G."""
    dense_size, expert_size = config.intermediate_size, config.moe_intermediate_size
    if expert_size < 1 or dense_size % expert_size or config.num_experts % (dense_size // expert_size):
        return None
    return dense_size // expert_size


def _qwen_moe_block_ids(config: PretrainedConfig) -> list[int]:
    """The blocks Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer give a sparse MoE block."""
    return [i for i in range(config.num_hidden_layers)
            if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0]


def _shared_fields(source: PretrainedConfig, moe_type: str) -> dict:
    names = SHARED_FIELDS + SHARED_FIELDS_OF_MOE_TYPE[moe_type]
    return {name: getattr(source, name) for name in names if hasattr(source, name)}


def differences_in_training(moe: MoEConfig) -> list[str]:
    """How the trained DeepSpeed model's routing differed from the exported (dropless, deterministic) HF model's."""
    notes = []
    if moe.drop_tokens:
        notes.append(f"the run dropped tokens above expert capacity (drop_tokens true, capacity_factor "
                     f"{moe.capacity_factor}, eval_capacity_factor {moe.eval_capacity_factor}); the HF model routes "
                     "every token, so the two agree on a batch only where DeepSpeed dropped none")
    if moe.top_k == 2 and moe.top2_2nd_expert_sampling:
        notes.append("the run picked the second expert with Gumbel noise (top2_2nd_expert_sampling true, which "
                     "DeepSpeed applies in eval too); the HF model takes the two highest-scoring experts, as "
                     "DeepSpeed does with top2_2nd_expert_sampling false")
    return notes
