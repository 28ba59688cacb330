"""Importing an HF MoE checkpoint: what its config says in DeepSpeed's terms (``CheckpointShape``), what of it the
DeepSpeed model cannot compute (``import_problems``), and the dense config and MoE settings that rebuild it
(``dense_config_and_moe_settings``). The classes and their routing facts: hf/configs.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from ..run.moe_layout import MoELayout
from .adapters import ADAPTERS
from .configs import GRANITE_MOE_TYPES, SIGMOID_MOE_TYPE, NotRepresentable, ernie_sparse_blocks, head_dim, shared_fields


@dataclass(frozen=True)
class CheckpointShape:
    """The routing and layout of an HF MoE checkpoint, in DeepSpeed's terms."""

    num_experts: int
    top_k: int
    expert_size: int             # an expert's hidden units
    block_ids: list[int]         # the sparse blocks
    shared_size: int             # the shared experts' hidden units, all together
    shared_gated: bool
    renormalises: bool           # the top-k weights are rescaled to sum to 1
    dense_size: int | None = None  # the dense blocks' hidden units (None: intermediate_size)
    score_function: str = "softmax"
    score_bias: bool = False     # the router chooses by the scores plus a bias the checkpoint holds
    routed_scaling_factor: float = 1.0
    expert_groups: int = 1       # group-limited routing: groups of experts, of which a token routes into...
    groups_per_token: int = 1    # ...its best this many


def checkpoint_shape(config: PretrainedConfig) -> CheckpointShape:
    """The checkpoint's routing and layout, read from each importable class's own config fields."""
    moe_type, num_layers = config.model_type, config.num_hidden_layers
    every_block = list(range(num_layers))
    if moe_type in ("mixtral", *GRANITE_MOE_TYPES):
        return CheckpointShape(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size,
                               every_block, getattr(config, "shared_intermediate_size", 0), False, True)
    if moe_type == "flex_olmo":
        return CheckpointShape(config.num_experts, config.num_experts_per_tok, config.intermediate_size, every_block,
                               0, False, config.norm_topk_prob)
    if moe_type == "hunyuan_v1_moe":  # one ungated shared MLP as wide as an expert
        return CheckpointShape(config.num_experts, config.moe_topk, config.intermediate_size, every_block,
                               config.intermediate_size, False, True)
    if moe_type == "ernie4_5_moe":
        blocks = ernie_sparse_blocks(config.moe_layer_start_index, config.moe_layer_end_index,
                                     config.moe_layer_interval, num_layers)
        return CheckpointShape(config.moe_num_experts, config.moe_k, config.moe_intermediate_size, blocks,
                               config.moe_num_shared_experts * config.moe_intermediate_size, False, True,
                               score_bias=True)
    if moe_type == "cohere2_moe":
        blocks = [i for i, kind in enumerate(config.mlp_layer_types) if kind == "sparse"]
        return CheckpointShape(config.num_experts, config.num_experts_per_tok, config.intermediate_size, blocks,
                               config.num_shared_experts * config.intermediate_size, False, True,
                               config.prefix_dense_intermediate_size or config.intermediate_size)
    if moe_type == SIGMOID_MOE_TYPE:
        return CheckpointShape(config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                               list(range(config.first_k_dense_replace, num_layers)),
                               config.n_shared_experts * config.moe_intermediate_size, False, config.norm_topk_prob,
                               score_function="sigmoid", score_bias=True,
                               routed_scaling_factor=config.routed_scaling_factor,
                               expert_groups=config.n_group, groups_per_token=config.topk_group)
    return CheckpointShape(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                           _qwen_moe_block_ids(config), getattr(config, "shared_expert_intermediate_size", 0),
                           True, config.norm_topk_prob)


def import_dense_model_type(config: PretrainedConfig) -> str:
    """The dense family an HF MoE checkpoint imports as: its adapter's, but for GLM4-MoE the one whose attention its
    settings make (Qwen3's q/k norms, Qwen2's q/k/v biases, else Llama's)."""
    if config.model_type == SIGMOID_MOE_TYPE:
        return "qwen3" if config.use_qk_norm else "qwen2" if config.attention_bias else "llama"
    return ADAPTERS[config.model_type].dense_model_type


def import_problems(config: PretrainedConfig) -> list[str]:
    """Why an HF MoE checkpoint's model cannot be rebuilt exactly from DeepSpeed MoE layers (empty: it can)."""
    moe_type = config.model_type
    if moe_type == "hunyuan_v1_moe" and not all(isinstance(getattr(config, name), int)
                                                for name in ("num_experts", "moe_topk")):
        return [f"per-layer num_experts {config.num_experts} or moe_topk {config.moe_topk}: DeepSpeed's MoE layers "
                "here have one top_k for every block"]
    shape, problems = checkpoint_shape(config), []
    if not shape.block_ids:
        problems.append("no block has an MoE FFN; load it as a dense model instead")
    if 0 < len(shape.block_ids) < config.num_hidden_layers and _granularity_beside_dense_blocks(shape, config) is None:
        problems.append(f"dense blocks of intermediate_size {shape.dense_size or config.intermediate_size} beside "
                        f"experts of moe_intermediate_size {shape.expert_size}: DeepSpeed's experts are copies of the "
                        "dense FFN or, as --expert_init granular makes them, 1/G of it with num_experts "
                        f"({shape.num_experts}) a multiple of G; no whole G gives these sizes")
    if shape.shared_size % shape.expert_size:
        shared, expert = (("shared_expert_intermediate_size", "moe_intermediate_size") if moe_type == "qwen2_moe"
                          else ("shared_intermediate_size", "intermediate_size"))
        problems.append(f"{shared} {shape.shared_size} is not a multiple of {expert} {shape.expert_size}: N "
                        "shared experts are N copies' width of an expert (--num_shared_experts N)")
    if moe_type == "qwen2_moe" and not config.qkv_bias:
        problems.append("qkv_bias is false: Qwen2's attention always has query/key/value biases")
    if moe_type == "qwen3_moe" and config.use_sliding_window:
        problems.append("use_sliding_window is true: Qwen3 windows only blocks from max_window_layers on, "
                        "Qwen3-MoE windows every block")
    if moe_type == "ernie4_5_moe":
        if config.use_bias:
            problems.append("use_bias is true: ERNIE-4.5's FFN biases would become the experts' biases, "
                            "ERNIE-4.5-MoE's experts have none")
        if config.moe_norm_min * shape.num_experts > 1:
            problems.append(f"moe_norm_min {config.moe_norm_min}: the top-k weights' sum can fall below it, where "
                            "ERNIE-4.5-MoE stops rescaling them to sum to 1; DeepSpeed's rule always rescales")
    if moe_type == SIGMOID_MOE_TYPE:
        problems += _glm4_moe_import_problems(config)
    if moe_type == "cohere2_moe":
        problems += _cohere2_moe_import_problems(config, shape)
    return problems


def _cohere2_moe_import_problems(config: PretrainedConfig, shape: CheckpointShape) -> list[str]:
    """What of Cohere2-MoE neither Cohere2's blocks nor DeepSpeed's router compute."""
    problems = []
    if config.rms_norm_eps is not None:
        problems.append("rms_norm_eps is set: Cohere2-MoE then normalises by RMSNorm, Cohere2 by LayerNorm")
    if config.expert_selection_fn != "softmax":
        problems.append(f"expert_selection_fn {config.expert_selection_fn!r}: weights from the sigmoid of the top-k "
                        "logits are not the scored rule's (it scores every expert before choosing)")
    if shape.shared_size and config.shared_expert_combination_strategy != "sum":
        problems.append(f"shared_expert_combination_strategy {config.shared_expert_combination_strategy!r}: "
                        "DeepSpeed's MoE layers add the shared experts' output")
    dense_full = [i for i, (mlp, attention) in enumerate(zip(config.mlp_layer_types, config.layer_types))
                  if mlp == "dense" and attention == "full_attention"]
    if dense_full and config.prefix_dense_sliding_window_pattern == 1:
        problems.append(f"prefix_dense_sliding_window_pattern 1: Cohere2-MoE rotates q/k in dense full-attention "
                        f"blocks {dense_full}, Cohere2 rotates only in sliding-window blocks")
    return problems


def _glm4_moe_import_problems(config: PretrainedConfig) -> list[str]:
    """What of GLM4-MoE no dense family's attention (Llama's, Qwen2's, Qwen3's) or the scored rule computes."""
    problems = []
    rotary = (config.rope_parameters or {}).get("partial_rotary_factor",
                                                getattr(config, "partial_rotary_factor", 1.0))
    if rotary != 1.0:
        problems.append(f"partial_rotary_factor {rotary}: Llama, Qwen2 and Qwen3 rotate whole heads")
    if config.use_qk_norm and config.attention_bias:
        problems.append("use_qk_norm and attention_bias: Qwen3 has the q/k norms but no q/k/v biases, Qwen2 the "
                        "biases but no norms")
    return problems


def dense_config_and_moe_settings(config: PretrainedConfig) -> tuple[PretrainedConfig, dict, MoELayout]:
    """From an HF MoE config: the dense config to build and convert, the MoE settings (num_experts, top_k,
    moe_layers, num_shared_experts, shared_expert_gate; norm_topk_prob where the class weighs routes otherwise than
    DeepSpeed's rule or chooses by a bias, with score_function and routed_scaling_factor; expert_init granular and
    its granularity when dense blocks are wider than the experts) that rebuild the checkpoint's model, and its MoE
    layout."""
    problems = import_problems(config)
    if problems:
        raise NotRepresentable(f"the {config.model_type} checkpoint", problems)
    moe_type, num_layers, shape = config.model_type, config.num_hidden_layers, checkpoint_shape(config)
    block_ids, ffn_size = shape.block_ids, shape.expert_size
    moe_layers = "all" if len(block_ids) == num_layers else block_ids
    num_shared = shape.shared_size // ffn_size
    settings = {"num_experts": shape.num_experts, "top_k": shape.top_k, "moe_layers": moe_layers,
                "num_shared_experts": num_shared, "shared_expert_gate": shape.shared_gated and num_shared > 0}
    # the scored rule (with the checkpoint's router bias loaded: hf/load.py), or DeepSpeed's rule where it weighs alike
    if shape.score_bias or shape.renormalises != (shape.top_k > 1):
        settings["norm_topk_prob"] = shape.renormalises
    if shape.score_function != "softmax":
        settings["score_function"] = shape.score_function
    if shape.routed_scaling_factor != 1.0:
        settings["routed_scaling_factor"] = shape.routed_scaling_factor
    if shape.groups_per_token < shape.expert_groups:
        settings.update(expert_groups=shape.expert_groups, max_groups_per_token=shape.groups_per_token)
    granularity = _granularity_beside_dense_blocks(shape, config) if moe_layers != "all" else 1
    if granularity > 1:  # dense blocks of the full width beside fine-grained experts: granular experts rebuild them
        ffn_size = shape.dense_size or config.intermediate_size
        settings.update(expert_init="granular", granularity=granularity)
    fields = dict(shared_fields(config, moe_type), head_dim=head_dim(config))
    dense = AutoConfig.for_model(import_dense_model_type(config), intermediate_size=ffn_size, **fields)
    return dense, settings, MoELayout(tuple(block_ids), (shape.num_experts,) * len(block_ids), granularity, num_shared)


def _granularity_beside_dense_blocks(shape: CheckpointShape, config: PretrainedConfig) -> int | None:
    """G such that a checkpoint's dense blocks (intermediate_size F) and experts (F/G wide) are the model
    --expert_init granular --granularity G builds; None when there is no such G."""
    dense_size, expert_size = shape.dense_size or config.intermediate_size, shape.expert_size
    if expert_size < 1 or dense_size % expert_size or shape.num_experts % (dense_size // expert_size):
        return None
    return dense_size // expert_size


def _qwen_moe_block_ids(config: PretrainedConfig) -> list[int]:
    """The blocks Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer give a sparse MoE block."""
    return [i for i in range(config.num_hidden_layers)
            if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0]
