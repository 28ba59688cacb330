"""Find the blocks and the FFN of a family that is not in the architecture table, by inspecting the model.

The blocks are the model's ``nn.ModuleList`` with one entry per layer (``num_hidden_layers``). A block's FFN is its
child module that maps hidden states to hidden states through its own projections: one or two projections into F
hidden units (a gate and an up projection, one fused gate_up projection of 2F outputs, or one plain projection) and
one projection out of them back to the D hidden states, with nothing else projecting. The attention does not fit
(several projections out to D, or a fused qkv projection of 3D outputs). What is found here is a guess: surgery
proves it on a probe model before it converts (moe/proof.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

# Child names that hint at a block's FFN, used only to choose between two modules that both fit.
FFN_NAMES = ("mlp", "feed_forward", "ffn", "ff", "mlp_block")
# Parts of a multimodal model's module paths that hold a tower beside the text decoder.
TOWERS = ("vision", "image", "visual", "audio", "speech")
# Config fields that count the experts of a model that is already a Mixture of Experts.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_moe_experts")
ADD_TO_TABLE = ("If the family has such an FFN under another form, add it to "
                "moe_models/models/architectures.py:ARCHITECTURES (docs/models.md says how).")


@dataclass(frozen=True)
class FoundFFN:
    """A block's FFN as inspection finds it: attribute names in the model and in the FFN."""

    blocks: str                       # dotted path from the causal LM to its blocks
    ffn: str                          # the block's child holding the FFN
    inputs: tuple[str, ...]           # the projections into the hidden units, in module order
    output: str                       # the projection out of them


def find_ffn(model: nn.Module) -> FoundFFN:
    """The blocks and FFN of ``model`` (real or on the meta device); a ValueError saying what was found otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    experts = _expert_count(config)
    if experts:
        raise ValueError(f"model type {model_type!r} is already a Mixture of Experts ({experts} experts per layer): "
                         "its FFNs are experts already. Continue training it in place from its folder (--model_name_or_path "
                         "FOLDER) where docs/models.md lists the family as continued in place, or start from a dense "
                         "model of the family.")
    blocks_path, blocks = _blocks(model, _num_layers(config), model_type)
    hidden = hidden_size_of(model)
    found = [_as_ffn(name, child, hidden) for name, child in blocks[0].named_children()]
    found = [f for f in found if f is not None]
    if not found:
        children = ", ".join(f"{name} ({type(child).__name__})" for name, child in blocks[0].named_children())
        raise ValueError(f"model type {model_type!r}: no child of its block ({type(blocks[0]).__name__}: {children}) "
                         f"holds an FFN, projections {hidden} -> F -> {hidden} and nothing else; surgery replaces "
                         "a module that maps hidden states to hidden states, so an FFN written inline in the block "
                         f"or split over several modules cannot be converted. {ADD_TO_TABLE}")
    found.sort(key=lambda f: f[0] not in FFN_NAMES)
    name, inputs, output = found[0]
    kinds = {type(getattr(block, name, None)) for block in blocks}
    if len(kinds) != 1:
        raise ValueError(f"model type {model_type!r}: its blocks differ ({len(kinds)} kinds of {name!r}: "
                         f"{', '.join(sorted(k.__name__ for k in kinds))}); surgery converts models whose blocks all "
                         f"hold the same FFN. {ADD_TO_TABLE}")
    return FoundFFN(blocks_path, name, inputs, output)


def hidden_size_of(model: nn.Module) -> int:
    """The width D of the hidden states between blocks (a composite config holds the decoder's apart)."""
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    return hidden if isinstance(hidden, int) else model.get_input_embeddings().embedding_dim


def _expert_count(config) -> int | None:
    text = config.get_text_config() if config is not None else None
    counts = [getattr(text, field, None) for field in EXPERT_COUNT_FIELDS]
    return next((n for n in counts if isinstance(n, int) and n > 1), None)


def checkpoint_expert_count(config: dict) -> int | None:
    """The experts per sparse block a config.json's fields count (an MoE model to continue in place, not
    a dense one to convert); None when it counts none."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return next((text[field] for field in EXPERT_COUNT_FIELDS
                 if isinstance(text.get(field), int) and not isinstance(text[field], bool) and text[field] > 1), None)


def counts_experts(config: dict) -> bool:
    """Whether a config.json's fields count experts: an MoE model to continue, not a dense one to convert."""
    return checkpoint_expert_count(config) is not None


def _num_layers(config) -> int | None:
    text = config.get_text_config() if config is not None else None
    return next((n for n in (getattr(text, k, None) for k in ("num_hidden_layers", "n_layer", "n_layers",
                                                                "num_layers")) if isinstance(n, int)), None)


def _blocks(model: nn.Module, num_layers: int | None, model_type: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList with one entry per layer, inside the text decoder (not a vision or audio tower), that holds
    the most parameters."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    inside = {id(m) for m in (decoder if isinstance(decoder, nn.Module) else model).modules()}
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == num_layers
             and id(module) in inside and not any(tower in name for tower in TOWERS)]
    if not lists:
        raise ValueError(f"model type {model_type!r}: no list of {num_layers} blocks (num_hidden_layers) in "
                         f"{type(model).__name__}, so its transformer blocks cannot be found. {ADD_TO_TABLE}")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a projection: nn.Linear (or a subclass) or GPT-2's Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return None


def _as_ffn(name: str, child: nn.Module, hidden: int) -> tuple[str, tuple[str, ...], str] | None:
    """(name, input projections, output projection) when ``child`` is an FFN on ``hidden`` states, else None."""
    projections = {n: f for n, f in ((n, _features(m)) for n, m in child.named_children()) if f is not None}
    for inner_name, inner in child.named_modules():
        owns_parameters = next(inner.parameters(recurse=False), None) is not None
        if inner_name and inner_name.split(".")[0] not in projections and owns_parameters and \
                not any(part in inner_name for part in ("act", "norm")):
            # a learnable activation (xIELU) or a norm (BitNet's) is part of an FFN; a conv or a mixer is not
            return None
    if next(child.parameters(recurse=False), None) is not None:
        return None
    outputs = [n for n, (fan_in, fan_out) in projections.items() if fan_out == hidden]
    if len(outputs) != 1:
        return None
    output = outputs[0]
    width = projections[output][0]
    inputs = tuple(n for n in projections if n != output)
    if not 1 <= len(inputs) <= 2 or width == hidden:
        return None
    expected = {width} if len(inputs) == 2 else {width, 2 * width}
    if any(projections[n][0] != hidden or projections[n][1] not in expected for n in inputs):
        return None
    return name, inputs, output
