"""The native transformers MoE class of each family, both ways: its config, and which blocks are sparse.

With softmax scores, Llama and Mistral map to Mixtral, Qwen2 to Qwen2-MoE, Qwen3 to Qwen3-MoE (``MOE_MODEL_TYPE_OF``); Llama and Mistral with shared experts map to GraniteMoeShared; with sigmoid
scores (``--score_function sigmoid``, DeepSeek-V3's routing) all four map to GLM4-MoE (the weights' names:
hf/adapters.py; GraniteMoeShared and GLM4-MoE are export only). A mapping is made only when the MoE class computes
exactly what the DeepSpeed model computes; anything else raises NotRepresentable with every reason at once.

Routing facts the checks rest on (deepspeed/moe/sharded_moe.py, transformers' */modeling_*_moe.py):
  - DeepSpeed top-1 scales the chosen expert's output by its softmax probability; top-2 and top-k > 2 rescale
    the chosen probabilities to sum to 1.
  - Mixtral always rescales the top-k probabilities to sum to 1 (so top-1 gets weight 1.0).
  - Qwen2-MoE and Qwen3-MoE rescale when ``norm_topk_prob`` is true, and keep the probabilities otherwise.
  - GLM4-MoE scores by sigmoid, chooses by the scores plus ``e_score_correction_bias`` (within ``topk_group`` of
    ``n_group`` groups; one group here), weighs by the unbiased scores, rescaled when ``norm_topk_prob``, times
    ``routed_scaling_factor``: the scored rule of moe/router.py. Its attention is Llama's with optional q/k RMSNorms
    per head (Qwen3's) and q/k/v biases (Qwen2's), rotary over ``partial_rotary_factor`` of each head (1.0 here).
  - GraniteMoe(Shared) takes the softmax of the top-k logits: the top-k probabilities rescaled to sum to 1 (so
    top-1 gets weight 1.0).
  - Qwen2-MoE adds sigmoid(shared_expert_gate(x)) x shared_expert(x); GraniteMoeShared adds shared_mlp(x), ungated.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from ..config import MoEConfig
from ..moe.layout import MoELayout
from ..moe.router import Scoring
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
    "glm4_moe": ("attention_bias",),  # Llama's and Qwen3's bias is also on o_proj, GLM4-MoE's is not: refused
    "granitemoeshared": ("attention_bias",),  # Granite has no sliding window: a Mistral window is refused
}
# The class names the refusals use.
CLASS_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE",
               "granitemoeshared": "GraniteMoeShared", "glm4_moe": "GLM4-MoE"}
# The transformers MoE class (model_type) a dense family exports to with softmax scores.
MOE_MODEL_TYPE_OF = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
SIGMOID_MOE_TYPE = "glm4_moe"  # the class for --score_function sigmoid, from these dense families:
SIGMOID_BASES = ("llama", "mistral", "qwen2", "qwen3")


class NotRepresentable(ValueError):
    """What a native HF MoE class cannot compute the way the model does, one reason per line."""

    def __init__(self, subject: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{subject} cannot be represented exactly:\n" + "\n".join(f"  - {p}" for p in problems))


def export_model_type(dense: PretrainedConfig, moe: MoEConfig) -> str | None:
    """The model_type of the transformers MoE class the model built from ``dense`` with ``moe`` exports to: GLM4-MoE
    for sigmoid scores, else its family's (``MOE_MODEL_TYPE_OF``), but GraniteMoeShared for Llama and Mistral with
    shared experts (Mixtral has none)."""
    if moe.score_function == "sigmoid":
        return SIGMOID_MOE_TYPE if dense.model_type in SIGMOID_BASES else None
    moe_type = MOE_MODEL_TYPE_OF.get(dense.model_type)
    return "granitemoeshared" if moe_type == "mixtral" and moe.num_shared_experts > 0 else moe_type


def export_problems(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> list[str]:
    """Why the DeepSpeed MoE model built from ``dense`` with ``moe`` (MoE layers as in ``layout``) has no exact native
    HF MoE class (empty: it has)."""
    moe_type = export_model_type(dense, moe)
    if moe_type is None:
        return [f"{dense.model_type} has no Mixture-of-Experts class in transformers (Mixtral covers Llama and "
                "Mistral, Qwen2-MoE and Qwen3-MoE cover Qwen2 and Qwen3, GLM4-MoE all four with sigmoid scores); "
                "keep using the DeepSpeed checkpoint"]
    name = CLASS_NAMES[moe_type]
    problems = []
    if moe_type != SIGMOID_MOE_TYPE:
        if moe.router_bias_update_rate > 0:
            problems.append(f"aux-loss-free bias (router_bias_update_rate) with softmax scores: {name} chooses experts "
                            "without a bias (GLM4-MoE has one, with --score_function sigmoid)")
        if moe.routed_scaling_factor != 1.0:
            problems.append(f"routed_scaling_factor {moe.routed_scaling_factor}: {name} does not scale the routed "
                            "output (GLM4-MoE does, with --score_function sigmoid)")
    else:
        problems += _glm4_moe_problems(dense, moe, layout)
    if layout.uniform_num_experts is None:
        problems.append(f"per-layer expert counts {list(layout.num_experts)}: an HF MoE class has one expert count "
                        "for every MoE block")
    if moe.use_residual:
        problems.append("residual MoE (use_residual): no HF MoE class mixes a dense FFN into the experts' output "
                        "with a learned coefficient")
    if moe_type in ("mixtral", "granitemoeshared"):
        problems += every_block_sparse_problems(dense, moe, layout, name)
    if moe_type == "mixtral":
        for bias in ("attention_bias", "mlp_bias"):
            if getattr(dense, bias, False):
                problems.append(f"{bias} is true: Mixtral's attention and experts have no biases")
    if moe_type == "qwen3_moe" and "sliding_attention" in (getattr(dense, "layer_types", None) or []):
        problems.append("sliding-window attention in some blocks: Qwen3-MoE applies its window to every block or "
                        "to none")
    if moe_type == "granitemoeshared":
        problems += granite_problems(dense, moe)
    if moe_type == "qwen3_moe" and moe.num_shared_experts > 0:
        problems.append(f"num_shared_experts {moe.num_shared_experts}: Qwen3-MoE has no shared expert")
    return problems


def every_block_sparse_problems(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout, name: str) -> list[str]:
    """What a class with an MoE FFN in every block and top-k weights renormalised even for top-1 (Mixtral,
    GraniteMoeShared) cannot compute."""
    problems = []
    if not Scoring.of(moe).renormalises(moe.top_k):
        problems.append("top_k 1: DeepSpeed scales the chosen expert's output by its router probability, "
                        f"{name} gives it weight 1.0 (it rescales the top-k probabilities to sum to 1; so does "
                        "--norm_topk_prob true)" if moe.top_k == 1 else
                        f"norm_topk_prob false: {name} rescales the top-k probabilities to sum to 1")
    if len(layout.blocks) < dense.num_hidden_layers:
        problems.append(f"moe_layers {moe.moe_layers!r} keeps dense FFNs in some of the {dense.num_hidden_layers} "
                        f"blocks: {name} has an MoE FFN in every block (Qwen2-MoE and Qwen3-MoE can mix them)")
    return problems


def granite_problems(dense: PretrainedConfig, moe: MoEConfig) -> list[str]:
    """What GraniteMoeShared, set to compute Llama's attention (granite_multipliers), cannot compute of a Llama or
    Mistral model with shared experts."""
    problems = []
    if moe.shared_expert_gate:
        problems.append("shared_expert_gate on a Llama/Mistral base: GraniteMoeShared's shared MLP has no gate and "
                        "no other HF MoE class has this attention with a shared expert; train without "
                        "--shared_expert_gate to export to GraniteMoeShared (Qwen2 bases export a gate to Qwen2-MoE)")
    if getattr(dense, "mlp_bias", False):
        problems.append("mlp_bias is true: GraniteMoeShared's experts and shared MLP have no biases")
    if getattr(dense, "sliding_window", None) is not None:
        problems.append(f"sliding_window {dense.sliding_window}: GraniteMoeShared's attention has no sliding window")
    return problems


def granite_multipliers(dense: PretrainedConfig) -> dict:
    """GraniteMoeShared's scalings set to compute a Llama-style model: 1.0 for the embeddings, the residual branches
    and the logits, and Llama's attention scale 1 / sqrt(head_dim) (the same Python float Llama computes)."""
    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    return {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
            "attention_multiplier": head_dim**-0.5}


def hf_moe_config(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> PretrainedConfig:
    """The native HF MoE config of the DeepSpeed model built from ``dense`` (its base_model config) with ``moe``."""
    if layout.is_dense:
        raise ValueError("the run has no MoE layer (--moe_layers none): it trained the dense model, which is not an MoE "
                         "model to export. Its weights are in the checkpoint's mp_rank_00_model_states.pt (`module`); "
                         "continue it as an MoE with train.py --upcycle_from_checkpoint TAG_FOLDER")
    problems = export_problems(dense, moe, layout)
    if problems:
        raise NotRepresentable(f"this {dense.model_type} MoE model", problems)
    moe_type = export_model_type(dense, moe)
    num_layers, num_experts = dense.num_hidden_layers, layout.uniform_num_experts
    expert_size = expert_intermediate_size(dense, moe)
    fields = _shared_fields(dense, moe_type)
    renormalises = Scoring.of(moe).renormalises(moe.top_k)
    if moe_type in ("mixtral", "granitemoeshared"):  # every block is sparse: intermediate_size is the experts'
        fields.update(num_local_experts=num_experts, num_experts_per_tok=moe.top_k, intermediate_size=expert_size)
    elif moe_type == SIGMOID_MOE_TYPE:  # dense blocks keep the dense FFN's intermediate_size
        fields.update(_glm4_moe_fields(dense, moe, layout), n_routed_experts=num_experts, num_experts_per_tok=moe.top_k,
                      norm_topk_prob=renormalises, moe_intermediate_size=expert_size,
                      intermediate_size=dense.intermediate_size)
    else:  # dense blocks keep the dense FFN's intermediate_size
        fields.update(num_experts=num_experts, num_experts_per_tok=moe.top_k, norm_topk_prob=renormalises,
                      moe_intermediate_size=expert_size, intermediate_size=dense.intermediate_size,
                      decoder_sparse_step=1, mlp_only_layers=[i for i in range(num_layers) if i not in layout.blocks])
    if moe_type == "qwen2_moe":
        # Qwen2-MoE always builds a shared expert; with no intermediate units it adds exactly zero (tested).
        fields.update(shared_expert_intermediate_size=moe.num_shared_experts * expert_size, qkv_bias=True)
    if moe_type == "granitemoeshared":
        fields.update(shared_intermediate_size=moe.num_shared_experts * expert_size, **granite_multipliers(dense))
    return AutoConfig.for_model(moe_type, **fields)


def _glm4_moe_problems(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> list[str]:
    """What GLM4-MoE cannot compute of a Llama, Mistral, Qwen2 or Qwen3 model with sigmoid routing."""
    problems = []
    first_moe_block = dense.num_hidden_layers - len(layout.blocks)
    if list(layout.blocks) != list(range(first_moe_block, dense.num_hidden_layers)):
        problems.append(f"MoE blocks {list(layout.blocks)}: GLM4-MoE keeps dense FFNs only in its first blocks "
                        f"(first_k_dense_replace); use --moe_layers all or the last blocks, e.g. "
                        f"'{','.join(map(str, range(dense.num_hidden_layers // 2, dense.num_hidden_layers)))}'")
    if dense.model_type in ("llama", "qwen3") and getattr(dense, "attention_bias", False):
        problems.append("attention_bias is true: it puts a bias on o_proj too, GLM4-MoE's o_proj has none")
    if getattr(dense, "mlp_bias", False):
        problems.append("mlp_bias is true: GLM4-MoE's FFNs and experts have no biases")
    windowed = (getattr(dense, "sliding_window", None) if dense.model_type == "mistral"
                else getattr(dense, "use_sliding_window", False))
    if windowed or "sliding_attention" in (getattr(dense, "layer_types", None) or []):
        problems.append("sliding-window attention: GLM4-MoE attends over the whole sequence")
    if moe.shared_expert_gate:
        problems.append("shared_expert_gate with sigmoid scores: GLM4-MoE's shared experts have no gate; train "
                        "without --shared_expert_gate")
    if layout.uniform_num_experts == 1:
        problems.append("1 expert: GLM4-MoE's router picks expert groups by their two best scores, so it needs 2+")
    return problems


def _glm4_moe_fields(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> dict:
    """GLM4-MoE settings that make it the dense family's attention with the scored rule's routing: full rotary, q/k
    norms for Qwen3, q/k/v biases for Qwen2, one expert group, the shared experts (none: an MLP with no units), dense
    FFNs in the first blocks."""
    rope = dict(dense.rope_parameters or {}, partial_rotary_factor=1.0)
    return dict(rope_parameters=rope, partial_rotary_factor=1.0, use_qk_norm=dense.model_type == "qwen3",
                attention_bias=dense.model_type == "qwen2" or bool(getattr(dense, "attention_bias", False)),
                head_dim=getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
                routed_scaling_factor=moe.routed_scaling_factor, n_group=1, topk_group=1,
                n_shared_experts=moe.num_shared_experts,  # N x moe_intermediate_size units, ungated
                first_k_dense_replace=dense.num_hidden_layers - len(layout.blocks), num_nextn_predict_layers=0)


def expert_intermediate_size(dense: PretrainedConfig, moe: MoEConfig) -> int:
    """An expert's hidden units: the dense FFN's, or 1/granularity of them with --expert_init granular. A shared
    expert is as wide."""
    return dense.intermediate_size // moe.granularity if moe.expert_init == "granular" else dense.intermediate_size


def import_problems(config: PretrainedConfig) -> list[str]:
    """Why an HF MoE checkpoint's model cannot be rebuilt exactly from DeepSpeed MoE layers (empty: it can)."""
    moe_type = config.model_type
    problems = []
    if moe_type in ("qwen2_moe", "qwen3_moe"):
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
        shared_size, ffn_size = config.shared_expert_intermediate_size, config.moe_intermediate_size
        if shared_size % ffn_size:
            problems.append(f"shared_expert_intermediate_size {shared_size} is not a multiple of moe_intermediate_size "
                            f"{ffn_size}: N shared experts are N copies' width of an expert (--num_shared_experts N)")
        if not config.qkv_bias:
            problems.append("qkv_bias is false: Qwen2's attention always has query/key/value biases")
    if moe_type == "qwen3_moe" and config.use_sliding_window:
        problems.append("use_sliding_window is true: Qwen3 windows only blocks from max_window_layers on, "
                        "Qwen3-MoE windows every block")
    return problems


def dense_config_and_moe_settings(config: PretrainedConfig) -> tuple[PretrainedConfig, dict, MoELayout]:
    """From an HF MoE config: the dense config to build and convert, the MoE settings (num_experts, top_k,
    moe_layers, num_shared_experts, shared_expert_gate, norm_topk_prob where the class weighs routes otherwise than
    DeepSpeed's rule; expert_init granular and its granularity when dense blocks are wider than the experts) that
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
    num_shared = getattr(config, "shared_expert_intermediate_size", 0) // ffn_size  # Qwen2-MoE's, gated
    settings = {"num_experts": num_experts, "top_k": config.num_experts_per_tok, "moe_layers": moe_layers,
                "num_shared_experts": num_shared, "shared_expert_gate": num_shared > 0}
    renormalises = True if moe_type == "mixtral" else config.norm_topk_prob
    if renormalises != (config.num_experts_per_tok > 1):  # not DeepSpeed's rule: the scored rule's norm_topk_prob
        settings["norm_topk_prob"] = renormalises
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
    if moe.top_k == 2 and moe.top2_2nd_expert_sampling and Scoring.of(moe).is_deepspeed:
        notes.append("the run picked the second expert with Gumbel noise (top2_2nd_expert_sampling true, which "
                     "DeepSpeed applies in eval too); the HF model takes the two highest-scoring experts, as "
                     "DeepSpeed does with top2_2nd_expert_sampling false")
    return notes
