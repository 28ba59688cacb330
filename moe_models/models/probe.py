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
