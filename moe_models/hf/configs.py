"""The native transformers MoE class of each family: which class a model exports to, what it cannot hold, and the
class's config (the way back: an exported folder is continued in place, hf/in_place_run.py).

With softmax scores each dense family maps to the MoE class with its very attention, norms and embeddings
(``MOE_MODEL_TYPE_OF``): Llama and Mistral to Mixtral (with shared experts: GraniteMoeShared, set to Llama's scalings),
Qwen2 to Qwen2-MoE, Qwen3 to Qwen3-MoE, Granite to GraniteMoe (with shared experts: GraniteMoeShared), Granite-SWA
to GraniteMoe-SWA, OLMo2 to
FlexOlmo, HunYuan-Dense to HunYuan-MoE, ERNIE-4.5 to ERNIE-4.5-MoE, Cohere2 to Cohere2-MoE; with sigmoid scores
(``--score_function sigmoid``, DeepSeek-V3's routing) Llama, Mistral, Qwen2 and Qwen3 map to GLM4-MoE (the weights'
names: hf/adapters.py). What
each class can hold of the routing and the layout is ``MOE_CLASSES``. A mapping is made only when the MoE class
computes exactly what the DeepSpeed model computes; anything else raises NotRepresentable with every reason at once.
``NO_MOE_CLASS`` says, for the families with none, what no transformers MoE class computes (docs/export.md's table
is generated from these tables).

Routing facts the checks rest on (deepspeed/moe/sharded_moe.py, transformers' */modeling_*.py):
  - DeepSpeed top-1 scales the chosen expert's output by its softmax probability; top-2 and top-k > 2 rescale
    the chosen probabilities to sum to 1.
  - Mixtral, HunYuan-MoE and ERNIE-4.5-MoE always rescale the top-k probabilities to sum to 1 (so top-1 gets weight
    1.0); ERNIE-4.5-MoE divides by the sum clamped to at least ``moe_norm_min`` (1e-12), which the sum of the top-k
    of E probabilities (at least 1/E) never is below.
  - GraniteMoe(Shared), GraniteMoe-SWA and Cohere2-MoE take the softmax of the top-k logits: the top-k
    probabilities rescaled to sum to 1.
  - Qwen2-MoE, Qwen3-MoE and FlexOlmo rescale when ``norm_topk_prob`` is true, and keep the probabilities otherwise.
  - ERNIE-4.5-MoE chooses by the softmax probabilities plus ``e_score_correction_bias`` and weighs by the unbiased
    ones: the scored rule of moe/router.py with softmax scores and an aux-loss-free bias.
  - GLM4-MoE scores by sigmoid, chooses by the scores plus ``e_score_correction_bias`` (within ``topk_group`` of
    ``n_group`` groups; one group here), weighs by the unbiased scores, rescaled when ``norm_topk_prob``, times
    ``routed_scaling_factor``: the scored rule of moe/router.py. Its attention is Llama's with optional q/k RMSNorms
    per head (Qwen3's) and q/k/v biases (Qwen2's), rotary over ``partial_rotary_factor`` of each head (1.0 here).
  - Shared experts: Qwen2-MoE adds sigmoid(shared_expert_gate(x)) x shared_expert(x); GraniteMoeShared,
    GraniteMoe-SWA, GLM4-MoE, ERNIE-4.5-MoE and Cohere2-MoE (shared_expert_combination_strategy "sum") add N
    experts' width of ungated MLP; HunYuan-MoE always adds one ungated MLP as wide as an expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from ..moe.router import Scoring
from ..run.config import MoEConfig
from ..run.moe_layout import MoELayout

# Config fields that mean the same in a dense family and its MoE class: embeddings, attention, norms, rope, tokens.
# A field the source config does not have keeps the target class's default.
SHARED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                 "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id", "bos_token_id",
                 "eos_token_id")
GRANITE_SCALINGS = ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier")
GRANITE_MOE_TYPES = ("granitemoe", "granitemoeshared", "granitemoe_swa")
SHARED_FIELDS_OF_MOE_TYPE = {
    "mixtral": ("sliding_window",),  # Mistral's and Mixtral's window apply to every block alike
    "qwen2_moe": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
    "qwen3_moe": ("attention_bias",),  # Qwen3-MoE windows every block, Qwen3 only some: sliding is refused
    "glm4_moe": ("attention_bias",),  # Llama's and Qwen3's bias is also on o_proj, GLM4-MoE's is not: refused
    # Granite has no sliding window: a Mistral window is refused; a Llama base gets Llama's scalings
    "granitemoe": ("attention_bias", *GRANITE_SCALINGS),
    "granitemoeshared": ("attention_bias", *GRANITE_SCALINGS),
    "granitemoe_swa": ("attention_bias", *GRANITE_SCALINGS, "sliding_window", "layer_types", "layer_rope_theta"),
    "flex_olmo": ("attention_bias",),
    "hunyuan_v1_moe": ("attention_bias", "eod_token_id", "sep_token_id"),
    "ernie4_5_moe": ("use_bias",),  # on the attention and the dense FFNs, not on the experts: refused
    "cohere2_moe": ("attention_bias", "layer_norm_eps", "logit_scale", "sliding_window", "layer_types"),
}
# Cohere2-MoE rotates q/k in its dense full-attention blocks when this is 1; Cohere2 (like Cohere2-MoE's sparse
# blocks) only in sliding-window blocks. Any other value keeps Cohere2's rule (it only spaces default layer_types).
COHERE2_PREFIX_PATTERN = 4


@dataclass(frozen=True)
class MoEClass:
    """What a transformers MoE class can hold of a DeepSpeed MoE model's routing and layout (its attention, norms and
    embeddings are its dense families' own: ``MOE_MODEL_TYPE_OF``)."""

    name: str                        # as the documentation and the refusals name it
    hf_class: str                    # its causal LM class
    # which blocks may keep a dense FFN: "none" (every block is sparse), "any" (mlp_only_layers), "first"
    # (first_k_dense_replace), "interval" (every interval-th block from a start to an end block)
    dense_blocks: str
    always_renormalises: bool        # rescales the top-k weights to sum to 1 even for top-1; else norm_topk_prob
    shared_experts: str              # "none" | "ungated" (N experts' width) | "gated or not" | "one" (always one)
    score_function: str = "softmax"
    score_bias: bool = False         # chooses by the scores plus a bias (the aux-loss-free bias)
    routed_scaling: bool = False     # multiplies the routed output by routed_scaling_factor
    expert_groups: bool = False      # chooses within a token's best expert groups (n_group, topk_group)


MOE_CLASSES = {
    "mixtral": MoEClass("Mixtral", "MixtralForCausalLM", "none", True, "none"),
    "granitemoe": MoEClass("GraniteMoe", "GraniteMoeForCausalLM", "none", True, "none"),
    "granitemoeshared": MoEClass("GraniteMoeShared", "GraniteMoeSharedForCausalLM", "none", True, "ungated"),
    "granitemoe_swa": MoEClass("GraniteMoe-SWA", "GraniteMoeSWAForCausalLM", "none", True, "ungated"),
    "qwen2_moe": MoEClass("Qwen2-MoE", "Qwen2MoeForCausalLM", "any", False, "gated or not"),
    "qwen3_moe": MoEClass("Qwen3-MoE", "Qwen3MoeForCausalLM", "any", False, "none"),
    "flex_olmo": MoEClass("FlexOlmo", "FlexOlmoForCausalLM", "none", False, "none"),
    "hunyuan_v1_moe": MoEClass("HunYuan-MoE", "HunYuanMoEV1ForCausalLM", "none", True, "one"),
    "ernie4_5_moe": MoEClass("ERNIE-4.5-MoE", "Ernie4_5_MoeForCausalLM", "interval", True, "ungated",
                             score_bias=True),
    "glm4_moe": MoEClass("GLM4-MoE", "Glm4MoeForCausalLM", "first", False, "ungated", score_function="sigmoid",
                         score_bias=True, routed_scaling=True, expert_groups=True),
    "cohere2_moe": MoEClass("Cohere2-MoE", "Cohere2MoeForCausalLM", "any", True, "ungated"),
}
# The transformers MoE class (model_type) a dense family exports to with softmax scores.
MOE_MODEL_TYPE_OF = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe",
                     "granite": "granitemoe", "olmo2": "flex_olmo", "hunyuan_v1_dense": "hunyuan_v1_moe",
                     "ernie4_5": "ernie4_5_moe", "cohere2": "cohere2_moe", "granite_swa": "granitemoe_swa"}
# The class a run with shared experts exports to instead, where the family's own has none: GraniteMoeShared holds
# Llama's and Mistral's function too, its scalings set to 1 (``granite_multipliers``).
WITH_SHARED_EXPERTS = {"mixtral": "granitemoeshared", "granitemoe": "granitemoeshared"}
SIGMOID_MOE_TYPE = "glm4_moe"  # the class for --score_function sigmoid, from these dense families:
SIGMOID_BASES = ("llama", "mistral", "qwen2", "qwen3")
# Why these dense families have no MoE class that computes their blocks, as read in transformers' modeling files.
# Any other family without an entry in MOE_MODEL_TYPE_OF gets NOT_MATCHED.
NO_MOE_CLASS = {
    "gpt2": "no GPT-2 MoE class: none has LayerNorm with biases, learned positions and GELU FFNs with biases",
    "olmo": "OLMoE and FlexOlmo have RMSNorm with weights and q/k norms; OLMo's LayerNorm has no weights and it clips "
            "q/k/v (clip_qkv)",
    "olmo3": "FlexOlmo has neither OLMo-3's sliding-window blocks nor its rope parameters per attention type",
    "phi3": "PhiMoE has LayerNorm with biases and sparsemixer routing; Phi-3 has RMSNorm",
    "glm4": "GLM4-MoE has no post-attention and post-FFN norms; GLM-4 has both",
    "starcoder2": "no MoE class has StarCoder2's LayerNorm with biases and GELU FFNs with biases",
}
NOT_MATCHED = "no transformers MoE class is matched to its blocks yet (hf/configs.py: MOE_MODEL_TYPE_OF)"


class NotRepresentable(ValueError):
    """What a native HF MoE class cannot compute the way the model does, one reason per line."""

    def __init__(self, subject: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{subject} cannot be represented exactly:\n" + "\n".join(f"  - {p}" for p in problems))


def export_model_type(dense: PretrainedConfig, moe: MoEConfig) -> str | None:
    """The model_type of the transformers MoE class the model built from ``dense`` with ``moe`` exports to: GLM4-MoE
    for sigmoid scores on its bases, else its family's (``MOE_MODEL_TYPE_OF``), or that class's sibling with shared
    experts (``WITH_SHARED_EXPERTS``) when the run has them."""
    if moe.score_function == "sigmoid" and dense.model_type in SIGMOID_BASES:
        return SIGMOID_MOE_TYPE
    moe_type = MOE_MODEL_TYPE_OF.get(dense.model_type)
    return WITH_SHARED_EXPERTS.get(moe_type, moe_type) if moe.num_shared_experts > 0 else moe_type


def export_problems(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> list[str]:
    """Why the DeepSpeed MoE model built from ``dense`` with ``moe`` (MoE layers as in ``layout``) has no exact native
    HF MoE class (empty: it has)."""
    moe_type = export_model_type(dense, moe)
    if moe_type is None:
        reason = NO_MOE_CLASS.get(dense.model_type, NOT_MATCHED)
        return [f"{dense.model_type} has no Mixture-of-Experts class in transformers ({reason}; "
                f"{_covered_families()}); keep using the DeepSpeed checkpoint"]
    target = MOE_CLASSES[moe_type]
    problems = _routing_problems(target, moe) + _layout_problems(target, dense, moe, layout)
    problems += _shared_expert_problems(target, moe)
    if moe.use_residual:
        problems.append("residual MoE (use_residual): no HF MoE class mixes a dense FFN into the experts' output "
                        "with a learned coefficient")
    if getattr(dense, "mlp_bias", False) or getattr(dense, "use_bias", False):
        name = "mlp_bias" if getattr(dense, "mlp_bias", False) else "use_bias"
        problems.append(f"{name} is true: {target.name}'s experts have no biases")
    return problems + _attention_problems(moe_type, dense)


def _covered_families() -> str:
    """Which families each class covers, for the refusal of a family without one."""
    by_class = {}
    for family, moe_type in MOE_MODEL_TYPE_OF.items():
        by_class.setdefault(MOE_CLASSES[moe_type].name, []).append(family)
    return "; ".join(f"{name} covers {', '.join(families)}" for name, families in by_class.items())


def _routing_problems(target: MoEClass, moe: MoEConfig) -> list[str]:
    """What ``target``'s router cannot compute of ``moe``'s."""
    name, problems = target.name, []
    if moe.score_function != target.score_function:
        problems.append(f"--score_function {moe.score_function}: {name} scores by {target.score_function}"
                        + (" (GLM4-MoE scores by sigmoid, with Llama's, Mistral's, Qwen2's or Qwen3's attention)"
                           if moe.score_function == "sigmoid" else ""))
    if moe.router_bias_update_rate > 0 and not target.score_bias:
        problems.append(f"aux-loss-free bias (router_bias_update_rate) with {moe.score_function} scores: {name} "
                        "chooses experts without a bias (GLM4-MoE has one, with --score_function sigmoid)")
    if moe.routed_scaling_factor != 1.0 and not target.routed_scaling:
        problems.append(f"routed_scaling_factor {moe.routed_scaling_factor}: {name} does not scale the routed "
                        "output (GLM4-MoE does, with --score_function sigmoid)")
    scoring = Scoring.of(moe)
    if scoring.max_groups_per_token < scoring.expert_groups and not target.expert_groups:
        problems.append(f"--max_groups_per_token {moe.max_groups_per_token} of --expert_groups {moe.expert_groups}: "
                        f"{name} chooses among all experts (GLM4-MoE chooses within groups, with --score_function "
                        "sigmoid)")
    if moe.num_null_experts and moe.null_expert_output == "identity":
        problems.append(f"--num_null_experts {moe.num_null_experts} --null_expert_output identity: {name} has no "
                        "null experts (transformers' LongcatFlash has such identity experts, zero_expert_num, but MLA "
                        "attention, which no dense family here has)")
    elif moe.num_null_experts:
        problems.append(f"--num_null_experts {moe.num_null_experts}: {name} has no zero-output experts (transformers' "
                        "LongcatFlash has zero_expert_num, but its zero-computation experts return their input "
                        "weighted, the identity, not zero, and it has MLA attention, which no dense family here has)")
    if moe.top_p is not None:
        problems.append(f"--top_p {moe.top_p}: {name} routes every token to top_k experts; no HF MoE class routes by "
                        "top-p")
    if target.always_renormalises and not Scoring.of(moe).renormalises(moe.top_k):
        problems.append("top_k 1: DeepSpeed scales the chosen expert's output by its router probability, "
                        f"{name} gives it weight 1.0 (it rescales the top-k probabilities to sum to 1; so does "
                        "--norm_topk_prob true)" if moe.top_k == 1 else
                        f"norm_topk_prob false: {name} rescales the top-k probabilities to sum to 1")
    return problems


def _layout_problems(target: MoEClass, dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> list[str]:
    """What ``target`` cannot hold of the MoE layout: the expert counts and which blocks are sparse."""
    name, num_layers, problems = target.name, dense.num_hidden_layers, []
    if layout.uniform_num_experts is None:
        problems.append(f"per-layer expert counts {list(layout.num_experts)}: an HF MoE class has one expert count "
                        "for every MoE block")
    if target.dense_blocks == "none" and len(layout.blocks) < num_layers:
        problems.append(f"moe_layers {moe.moe_layers!r} keeps dense FFNs in some of the {num_layers} blocks: {name} "
                        "has an MoE FFN in every block (Qwen2-MoE and Qwen3-MoE can mix them)")
    first_moe_block = num_layers - len(layout.blocks)
    if target.dense_blocks == "first" and list(layout.blocks) != list(range(first_moe_block, num_layers)):
        problems.append(f"MoE blocks {list(layout.blocks)}: {name} keeps dense FFNs only in its first blocks "
                        f"(first_k_dense_replace); use --moe_layers all or the last blocks, e.g. "
                        f"'{','.join(map(str, range(num_layers // 2, num_layers)))}'")
    if target.dense_blocks == "interval" and ernie_moe_layers(layout.blocks) is None:
        problems.append(f"MoE blocks {list(layout.blocks)}: {name} makes block i sparse when (i + 1) is a multiple "
                        "of moe_layer_interval, from moe_layer_start_index to moe_layer_end_index; use --moe_layers "
                        "all, every:N or such a range")
    if moe.score_function == "sigmoid" and layout.uniform_num_experts == 1:
        problems.append(f"1 expert: {name}'s router picks expert groups by their two best scores, so it needs 2+")
    return problems


def _shared_expert_problems(target: MoEClass, moe: MoEConfig) -> list[str]:
    """What ``target`` cannot hold of the shared experts."""
    name, count = target.name, moe.num_shared_experts
    if target.shared_experts == "none" and count > 0:
        return [f"num_shared_experts {count}: {name} has no shared expert"]
    if target.shared_experts == "one" and count != 1:
        return [f"num_shared_experts {count}: {name} adds exactly one shared expert (an ungated MLP as wide as an "
                "expert) to every MoE block; train with --num_shared_experts 1"]
    if target.shared_experts in ("ungated", "one") and moe.shared_expert_gate:
        return [f"shared_expert_gate: {name}'s shared experts have no gate; train without --shared_expert_gate "
                "(Qwen2 bases export a gate to Qwen2-MoE)"]
    return []


def _attention_problems(moe_type: str, dense: PretrainedConfig) -> list[str]:
    """What ``moe_type``'s attention cannot compute of the dense family's (biases, sliding windows)."""
    name, problems = MOE_CLASSES[moe_type].name, []
    windowed = (getattr(dense, "sliding_window", None) if dense.model_type == "mistral"
                else getattr(dense, "use_sliding_window", False))
    if moe_type == "mixtral" and getattr(dense, "attention_bias", False):
        problems.append("attention_bias is true: Mixtral's attention has no biases")
    if moe_type == "qwen3_moe" and "sliding_attention" in (getattr(dense, "layer_types", None) or []):
        problems.append("sliding-window attention in some blocks: Qwen3-MoE applies its window to every block or "
                        "to none")
    if moe_type in ("granitemoe", "granitemoeshared") and getattr(dense, "sliding_window", None) is not None:
        problems.append(f"sliding_window {dense.sliding_window}: {name}'s attention has no sliding window")
    if moe_type == SIGMOID_MOE_TYPE:
        if dense.model_type in ("llama", "qwen3") and getattr(dense, "attention_bias", False):
            problems.append("attention_bias is true: it puts a bias on o_proj too, GLM4-MoE's o_proj has none")
        if windowed or "sliding_attention" in (getattr(dense, "layer_types", None) or []):
            problems.append("sliding-window attention: GLM4-MoE attends over the whole sequence")
    return problems


def ernie_moe_layers(blocks) -> tuple[int, int, int] | None:
    """(moe_layer_start_index, moe_layer_end_index, moe_layer_interval) that make exactly ``blocks`` sparse in
    ERNIE-4.5-MoE (block i when start <= i <= end and (i + 1) % interval == 0); None when none do."""
    blocks = sorted(blocks)
    if not blocks:
        return None
    interval = blocks[1] - blocks[0] if len(blocks) > 1 else blocks[0] + 1
    layers = (blocks[0], blocks[-1], interval)
    return layers if ernie_sparse_blocks(*layers, num_layers=blocks[-1] + 1) == blocks else None


def ernie_sparse_blocks(start: int, end: int, interval: int, num_layers: int) -> list[int]:
    """The blocks Ernie4_5_MoeDecoderLayer gives a sparse MoE block (an end of -1: the last block)."""
    end = num_layers - 1 if end < 0 else end
    return [i for i in range(num_layers) if start <= i <= end and (i + 1) % interval == 0]


def granite_multipliers(dense: PretrainedConfig) -> dict:
    """GraniteMoe(Shared)'s scalings set to compute a Llama-style model: 1.0 for the embeddings, the residual branches
    and the logits, and Llama's attention scale 1 / sqrt(head_dim) (the same Python float Llama computes)."""
    return {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
            "attention_multiplier": head_dim(dense)**-0.5}


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
    num_layers, num_experts, top_k = dense.num_hidden_layers, layout.uniform_num_experts, moe.top_k
    expert_size = layout.expert_width(dense.intermediate_size)
    shared_size = layout.num_shared_experts * expert_size
    fields = dict(shared_fields(dense, moe_type), head_dim=head_dim(dense))
    renormalises = Scoring.of(moe).renormalises(top_k)
    if moe_type in ("mixtral", *GRANITE_MOE_TYPES):  # every block sparse: intermediate_size is the experts'
        fields.update(num_local_experts=num_experts, num_experts_per_tok=top_k, intermediate_size=expert_size)
    elif moe_type == "flex_olmo":
        fields.update(num_experts=num_experts, num_experts_per_tok=top_k, intermediate_size=expert_size,
                      norm_topk_prob=renormalises)
    elif moe_type == "hunyuan_v1_moe":  # its shared MLP is intermediate_size wide: one expert's width
        fields.update(num_experts=num_experts, moe_topk=top_k, intermediate_size=expert_size)
    elif moe_type == "ernie4_5_moe":  # dense blocks keep the dense FFN's intermediate_size
        start, end, interval = ernie_moe_layers(layout.blocks)
        fields.update(moe_num_experts=num_experts, moe_k=top_k, moe_intermediate_size=expert_size,
                      intermediate_size=dense.intermediate_size, moe_num_shared_experts=moe.num_shared_experts,
                      moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval)
    elif moe_type == "cohere2_moe":  # dense blocks keep the dense FFN's width, in prefix_dense_intermediate_size
        fields.update(num_experts=num_experts, num_experts_per_tok=top_k, intermediate_size=expert_size,
                      prefix_dense_intermediate_size=dense.intermediate_size, expert_selection_fn="softmax",
                      mlp_layer_types=["sparse" if i in layout.blocks else "dense" for i in range(num_layers)],
                      num_shared_experts=moe.num_shared_experts, shared_expert_combination_strategy="sum",
                      prefix_dense_sliding_window_pattern=COHERE2_PREFIX_PATTERN)
    elif moe_type == SIGMOID_MOE_TYPE:  # dense blocks keep the dense FFN's intermediate_size
        fields.update(_glm4_moe_fields(dense, moe, layout), n_routed_experts=num_experts, num_experts_per_tok=top_k,
                      norm_topk_prob=renormalises, moe_intermediate_size=expert_size,
                      intermediate_size=dense.intermediate_size)
    else:  # dense blocks keep the dense FFN's intermediate_size
        fields.update(num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=renormalises,
                      moe_intermediate_size=expert_size, intermediate_size=dense.intermediate_size,
                      decoder_sparse_step=1, mlp_only_layers=[i for i in range(num_layers) if i not in layout.blocks])
    if moe_type == "qwen2_moe":
        # Qwen2-MoE always builds a shared expert; with no intermediate units it adds exactly zero (tested).
        fields.update(shared_expert_intermediate_size=shared_size, qkv_bias=True)
    if moe_type in GRANITE_MOE_TYPES and MOE_MODEL_TYPE_OF[dense.model_type] == "mixtral":  # Llama's, Mistral's
        fields.update(granite_multipliers(dense))
    if moe_type in ("granitemoeshared", "granitemoe_swa"):
        fields.update(shared_intermediate_size=shared_size)
    return AutoConfig.for_model(moe_type, **fields)


def _glm4_moe_fields(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> dict:
    """GLM4-MoE settings that make it the dense family's attention with the scored rule's routing: full rotary, q/k
    norms for Qwen3, q/k/v biases for Qwen2, one expert group, the shared experts (none: an MLP with no units), dense
    FFNs in the first blocks; the expert groups of group-limited routing (one group without it)."""
    rope = dict(dense.rope_parameters or {}, partial_rotary_factor=1.0)
    return dict(rope_parameters=rope, partial_rotary_factor=1.0, use_qk_norm=dense.model_type == "qwen3",
                attention_bias=dense.model_type == "qwen2" or bool(getattr(dense, "attention_bias", False)),
                routed_scaling_factor=moe.routed_scaling_factor, n_group=Scoring.of(moe).expert_groups,
                topk_group=Scoring.of(moe).max_groups_per_token,
                n_shared_experts=moe.num_shared_experts,  # N x moe_intermediate_size units, ungated
                first_k_dense_replace=dense.num_hidden_layers - len(layout.blocks), num_nextn_predict_layers=0)


def head_dim(config: PretrainedConfig) -> int:
    """The head width a config's attention uses, written out for the other class's config, whose default may differ
    (ERNIE-4.5's and Cohere2-MoE's is 128)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shared_fields(source: PretrainedConfig, moe_type: str) -> dict:
    names = SHARED_FIELDS + SHARED_FIELDS_OF_MOE_TYPE[moe_type]
    return {name: getattr(source, name) for name in names if hasattr(source, name)}
