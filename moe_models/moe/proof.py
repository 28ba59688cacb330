"""The proof every conversion passes: on a small probe model of the model's family (models/probe.py: its config
with small sizes), the converted model with copied experts and no dropped tokens must give the dense model's
logits. It checks what the architecture table or inspection found (the blocks, the FFN, its projections), how the
block uses the FFN's output, and the expert form the grouped path runs (moe/ffn_form.py), for the cost of a model
with two small blocks. The result is kept per (config, expert implementation).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from ..run.config import MoEConfig
from ..models.architectures import Architecture, architecture_of
from ..models.probe import small_config

PROBE_SHAPE = (2, 8)  # sequences, tokens
TOLERANCE = 1e-4      # on logits, relative to their largest magnitude (fp32)
HOW_TO_ADD = ("To add the family by hand, give its blocks' path and FFN attribute in "
              "moe_models/models/architectures.py:ARCHITECTURES (docs/models.md); to convert without this check, "
              "pass --prove_conversion false.")

_PROVEN: dict[tuple[str, str, str], str | None] = {}  # (class, config JSON, moe_impl) -> None, or why the proof failed


def prove_conversion(model_class: type, config: PretrainedConfig, cfg: MoEConfig, convert) -> None:
    """Raise a ValueError saying what was found when converting a probe model (``model_class`` built from
    ``config`` with small sizes) with ``convert`` (``convert_to_moe``) changes its logits."""
    key = (model_class.__qualname__, config.to_json_string(use_diff=False), cfg.moe_impl)
    if key not in _PROVEN:
        _PROVEN[key] = _disproof(model_class, config, cfg, convert)
    if _PROVEN[key] is not None:
        raise ValueError(_PROVEN[key])


def probe_moe_config(cfg: MoEConfig) -> MoEConfig:
    """What the probe converts with: two copied experts, both chosen (their weights sum to 1), dropless,
    deterministic, no shared experts, one rank; the expert implementation of the run."""
    return MoEConfig(num_experts=2, top_k=2, expert_init="copy", drop_tokens=False, top2_2nd_expert_sampling=False,
                     moe_impl=cfg.moe_impl, prove_conversion=False)


def _disproof(model_class: type, config: PretrainedConfig, cfg: MoEConfig, convert) -> str | None:
    model_type = getattr(config, "model_type", "?")
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # no draw from the run's generators
        torch.manual_seed(0)
        try:
            dense = model_class(small_config(config)).float().eval()
        except Exception as err:  # noqa: BLE001 - a family transformers cannot build small: say so, whatever it is
            return (f"model type {model_type!r}: its probe model (its config with small sizes) cannot be built "
                    f"({type(err).__name__}: {err}). {HOW_TO_ADD}")
        vocab = dense.get_input_embeddings().num_embeddings
        ids = torch.randint(0, min(vocab, 256), PROBE_SHAPE)
        found = None
        try:
            with torch.no_grad():
                expected = _logits(dense, ids)
        except Exception as err:  # noqa: BLE001
            return (f"model type {model_type!r}: its probe model (its config with small sizes) does not run "
                    f"({type(err).__name__}: {err}). {HOW_TO_ADD}")
        try:
            with torch.no_grad():
                found = architecture_of(dense)
                converted = convert(dense, probe_moe_config(cfg))
                got = _logits(converted, ids)
        except Exception as err:  # noqa: BLE001 - any failure of the converted model is the refusal's reason
            return (f"model type {model_type!r}: the converted probe model fails ({type(err).__name__}: {err}); "
                    f"found: {_found_text(found)}. {HOW_TO_ADD}")
    scale = expected.abs().max().item() or 1.0
    difference = (got - expected).abs().max().item() / scale
    if not difference <= TOLERANCE:
        return (f"model type {model_type!r}: converted with copied experts, its probe model's logits change "
                f"(largest difference {difference:.2e} of the largest logit; at most {TOLERANCE:g} allowed), so "
                f"the module replaced is not the block's whole FFN or the block uses it differently; found: "
                f"{_found_text(found)}. {HOW_TO_ADD}")
    return None


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _found_text(arch: Architecture | None) -> str:
    if arch is None:
        return "no block FFN"
    how = "by inspection" if arch.discovered else "in the architecture table"
    inputs, output = arch.ffn_projections
    return (f"{how}, blocks {arch.blocks!r}, FFN {arch.ffn!r} with projections {', '.join(inputs)} -> {output}")
