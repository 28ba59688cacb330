"""Small models of any family: the same config (activation, biases, norms, block wiring, multipliers) with its sizes
shrunk, so that a model of the family can be built and run in well under a second. The conversion proof
(moe/proof.py) runs on one; the coverage test (tests/models/test_coverage.py) builds one per family.
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

# Size fields as transformers' configs spell them, and the small value each gets where a config has it. The hidden
# size (64) and FFN width (256; some families halve it) differ, so that the FFN's projections can be told from the attention's.
SMALL_SIZES = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim"), 64),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "inner_hidden_size"), 256),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "multi_query_group_num"), 2),
    "head_dim": 16,
    "rotary_dim": 8,
    "vocab_size": 320,  # room for the 257 byte-level tokens
    **dict.fromkeys(("max_position_embeddings", "n_positions", "seq_length"), 512),
}
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def small_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` (or of its text config, for composite configs) with every size field it has set as in
    ``SMALL_SIZES``, per-layer lists (``layer_types``) cut to the new depth, and special token ids that fall outside
    the small vocabulary moved to its last id. Everything that decides the function stays."""
    small = copy.deepcopy(config)
    for name in getattr(small, "sub_configs", {}):  # a vision tower, an audio encoder: small too
        part = getattr(small, name, None)
        if isinstance(part, PretrainedConfig) and part is not small.get_text_config():
            _shrink(part)
    _shrink(small.get_text_config())
    return small


def _shrink(text: PretrainedConfig) -> None:
    depth = _depth(text)
    for key, value in SMALL_SIZES.items():
        if key in text.to_dict() or isinstance(getattr(text, key, None), int):
            _set(text, key, value)
    layers = _depth(text)
    for key, value in text.to_dict().items():  # per-layer lists: layer_types, mlp_layer_types, ...
        if isinstance(value, list) and depth and layers and len(value) == depth:
            _set(text, key, getattr(text, key)[:layers])
    vocab = getattr(text, "vocab_size", None)
    for key in TOKEN_ID_FIELDS:
        token_id = getattr(text, key, None)
        if isinstance(vocab, int) and isinstance(token_id, int) and token_id >= vocab:
            _set(text, key, vocab - 1)


def _depth(config: PretrainedConfig) -> int | None:
    return next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
                 if isinstance(getattr(config, k, None), int)), None)


def _set(config: PretrainedConfig, key: str, value) -> None:
    """Set one field; read-only properties (a derived head_dim) keep their value."""
    try:
        setattr(config, key, value)
    except (AttributeError, TypeError):
        pass


# An MoE family's fields, and the small value each gets in its probe: 8 experts (ep_size 2 holds 4 each), at most 2
# per token, 4 expert groups of which 2 are chosen (group-limited routing), expert widths of 32, and the first
# sparse block at layer 1 (block 0 stays dense where the family has dense blocks first).
EXPERT_COUNT_SIZES = dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                                    "num_moe_experts"), 8)
SMALL_MOE_SIZES = {
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size"), 32),
    "n_group": 4,
    "topk_group": 2,
    "zero_expert_num": 2,
    **dict.fromkeys(("first_k_dense_replace", "num_dense_layers"), 1),
    # multi-head latent attention (DeepSeek-V2/V3 and their kin): its widths with the probe's head_dim of 16
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"), 16),
    "qk_head_dim": 32,  # qk_nope_head_dim + qk_rope_head_dim, where a config stores it
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 32),
    # Mamba-2 mixers of hybrids: heads x head width = 2 x the hidden size of 64, small states and chunks (their
    # reference CPU kernels cost as the state size times the chunk length)
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads"), 8),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "ssm_state_size", "mamba_d_state"), 16),
    **dict.fromkeys(("chunk_size", "mamba_chunk_size"), 16),
    "n_groups": 2,
    # linear-attention mixers (Kimi-Linear's)
    "linear_num_heads": 4,
    "linear_head_dim": 16,
}
# Families whose defaults leave the per-layer kinds unset, which their classes read: the probe's kinds.
PROBE_LAYER_TYPES = {"lfm2_moe": ["conv", "full_attention"]}
MOE_TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k")
MAX_PROBE_TOP_K = 2


def small_moe_config(config: PretrainedConfig) -> PretrainedConfig:
    """``small_config`` of an MoE family, its MoE sizes made small too: 8 experts, at most 2 per token (2 where the
    family's defaults leave it unset), and ``SMALL_MOE_SIZES`` (a field set to 0 or 1, or not an integer, keeps its
    value); a per-layer ``mlp_layer_types`` keeps its first entry and makes the others sparse."""
    small = small_config(config)
    text = small.get_text_config()
    for sizes, smallest in ((EXPERT_COUNT_SIZES, 1), (SMALL_MOE_SIZES, 2)):
        for key, value in sizes.items():
            current = getattr(text, key, None)
            if isinstance(current, int) and not isinstance(current, bool) and current >= smallest:
                _set(text, key, value)
    for key in MOE_TOP_K_FIELDS:
        current = getattr(text, key, "absent")
        if current is None or (isinstance(current, int) and current > MAX_PROBE_TOP_K):
            _set(text, key, MAX_PROBE_TOP_K)
    if isinstance(getattr(text, "kv_lora_rank", None), int) and isinstance(getattr(text, "num_key_value_heads", None),
                                                                          int):
        _set(text, "num_key_value_heads", text.num_attention_heads)  # latent attention: a key per head
    kinds = getattr(text, "mlp_layer_types", None)
    full_kinds = getattr(config.get_text_config(), "mlp_layer_types", None)
    if isinstance(kinds, list) and isinstance(full_kinds, list) and "sparse" in full_kinds:
        _set(text, "mlp_layer_types", kinds[:1] + ["sparse"] * (len(kinds) - 1))
    if getattr(text, "layer_types", "absent") is None and text.model_type in PROBE_LAYER_TYPES:
        _set(text, "layer_types", PROBE_LAYER_TYPES[text.model_type][:_depth(text)])
    return small
