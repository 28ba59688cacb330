"""Every causal-LM family of the installed transformers (its auto mapping), built small and put through surgery:
which convert (the conversion proven on a probe) and which are refused, with the reason. docs/models.md carries the
table (tests/models/test_coverage.py checks it; UPDATE_DOCS=1 rewrites it)."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.moe import _default_apply_gate
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moe_models import MoEConfig, convert_to_moe
from moe_models.hf.in_place import sparse_blocks, swap_class
from moe_models.hf.in_place_proof import probe_model, prove_in_place
from moe_models.models.architectures import ARCHITECTURES, architecture_of_config
from moe_models.models.discovery import EXPERT_COUNT_FIELDS
from moe_models.models.probe import small_config, small_moe_config
from moe_models.moe.expert_major_experts import ExpertMajorExperts
from moe_models.moe.identity_experts import IdentityExperts
from moe_models.moe.self_routing_experts import SelfRoutingExperts
from moe_models.moe.ffn_form import ffn_form, FFNForm
from moe_models.moe.proof import prove_conversion

# Families whose probe does not fit a CI machine (measured here): their small config still asks for far more.
NOT_RUN_HERE = {"falcon_h1": "at small sizes its Mamba mixer's reference (CPU) kernel still allocates 16 GiB; "
                             "convert it with the proof on, on a machine that has the memory"}
MAX_PARAMETERS = 3_000_000  # a small config above this (sub-modules the size fields do not reach) is not run here


@dataclass(frozen=True)
class Outcome:
    model_type: str
    causal_lm: str          # transformers' class for AutoModelForCausalLM
    converts: bool
    how: str                # converted: where the FFN was found and the grouped form; refused: the reason


def causal_lm_families() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@functools.cache
def survey() -> tuple[Outcome, ...]:
    return tuple(outcome_of(model_type) for model_type in causal_lm_families())


def converting() -> list[str]:
    return [o.model_type for o in survey() if o.converts]


def outcome_of(model_type: str) -> Outcome:
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    try:
        config = small_config(AutoConfig.for_model(model_type))
    except Exception as err:  # noqa: BLE001 - whatever transformers raises is the reason
        return Outcome(model_type, name, False, f"transformers builds no config of it from defaults "
                       f"({type(err).__name__}: {_first_line(err)}); not checked here")
    if getattr(config, "is_encoder_decoder", False):
        return Outcome(model_type, name, False, "an encoder-decoder model: surgery converts decoder-only causal LMs")
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception as err:  # noqa: BLE001
        return Outcome(model_type, name, False, f"transformers builds no model of its default config with small "
                       f"sizes ({type(err).__name__}: {_first_line(err)}); not checked here")
    try:
        arch = architecture_of_config(config)
    except ValueError as err:
        return Outcome(model_type, name, False, _first_line(err))
    if size > MAX_PARAMETERS:
        return Outcome(model_type, name, False, f"not checked here: its small config still has {size / 1e6:.0f}M "
                       "parameters (parts the size fields do not reach); convert it with the proof on")
    if model_type in NOT_RUN_HERE:
        return Outcome(model_type, name, False, f"not checked here: {NOT_RUN_HERE[model_type]}")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        prove_conversion(type(model), model.config, MoEConfig(), convert_to_moe)  # as convert_to_moe does
    except ValueError as err:
        return Outcome(model_type, name, False, _first_line(err))
    return Outcome(model_type, name, True, f"{'table' if model_type in ARCHITECTURES else 'inspection'}: "
                   f"`{arch.ffn_path(0).replace('.0.', '.N.')}`, {experts_form(config, arch)}")


def experts_form(config, arch) -> str:
    """How --moe_impl grouped runs the family's experts."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ffn = getattr(arch.blocks_of(model)[0], arch.ffn)
    with torch.device("cpu"):
        ffn = ffn.to_empty(device="cpu").train()
        for param in ffn.parameters():
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(0))
    form = ffn_form(ffn, arch.ffn_projections)
    if not isinstance(form, FFNForm):
        return f"expert loop ({form})"
    kind = ("fused gated" if len(form.inputs) == 1 else "gated") if form.gated else "plain"
    act = form.activation or type(form.act_fn).__name__ if not callable(getattr(form.act_fn, "__name__", None)) \
        else form.act_fn.__name__
    biases = ", biases" if any(getattr(getattr(ffn, p), "bias", None) is not None for p in form.projections) else ""
    return f"grouped: {kind}, {act}{biases}"


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def models_markdown() -> str:
    rows = survey()
    converted = [o for o in rows if o.converts]
    refused = [o for o in rows if not o.converts]
    title = (f"Installed transformers {transformers.__version__}: {len(rows)} families in "
             f"`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {len(converted)} convert, {len(refused)} are refused.")
    return two_tables(title, ("Converted", "FFN found by, path, experts on --moe_impl grouped", converted),
                      ("Refused", "reason", refused))


def two_tables(title: str, *tables: tuple[str, str, list]) -> str:
    """A title line, then per (heading, third column, outcomes) a table of model_type, class and that column."""
    lines = [title]
    for heading, column, outcomes in tables:
        lines += ["", f"### {heading}", "", f"| model_type | class | {column} |", "|---|---|---|"]
        lines += [f"| {o.model_type} | {o.causal_lm} | {o.how.replace('|', '/')} |" for o in outcomes]
    return "\n".join(lines) + "\n"


def refresh_doc_table(doc: Path, begin: str, end: str, markdown: str) -> bool:
    """Whether ``doc`` holds ``markdown`` between the ``begin`` and ``end`` markers; UPDATE_DOCS=1 writes it there
    first."""
    text = doc.read_text()
    table = f"{begin}\n{markdown}{end}"
    if os.environ.get("UPDATE_DOCS") == "1":
        text = re.sub(re.escape(begin) + ".*" + re.escape(end), lambda _: table, text, flags=re.S)
        doc.write_text(text)
    return table in text


# ---- Continuing an MoE in place (moe_models/hf/in_place.py): the MoE families and their proofs ----

@dataclass(frozen=True)
class InPlaceOutcome:
    model_type: str
    causal_lm: str
    in_place: bool
    how: str                # proven: the sparse blocks, the experts' class and function; refused: the reason


def is_moe_family(model_type: str) -> bool:
    """A family whose default config has a field that counts experts (HunYuan-MoE's defaults to 1)."""
    try:
        text = AutoConfig.for_model(model_type).get_text_config()
    except Exception:  # noqa: BLE001 - no config from defaults: not surveyed (the table above says why)
        return False
    return any(isinstance(getattr(text, field, None), int) for field in EXPERT_COUNT_FIELDS)


@functools.cache
def in_place_survey() -> tuple[InPlaceOutcome, ...]:
    return tuple(in_place_outcome_of(t) for t in causal_lm_families() if is_moe_family(t))


def in_place_families() -> list[str]:
    return [o.model_type for o in in_place_survey() if o.in_place]


def in_place_outcome_of(model_type: str) -> InPlaceOutcome:
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    config = AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model_class = type(AutoModelForCausalLM.from_config(small_moe_config(config)))  # the class it loads
    try:
        prove_in_place(model_class, config)
    except ValueError as err:
        return InPlaceOutcome(model_type, name, False, _first_line(err))
    probe = probe_model(model_class, config)
    blocks = sparse_blocks(probe)
    experts = blocks[0].experts
    own_gate = vars(type(experts)).get("_apply_gate", _default_apply_gate) is not _default_apply_gate
    act_fn = swap_class(experts).activation(experts) or getattr(experts, "act_fn", None)
    gated = "gate_up_proj" in (swap_class(experts).family_names(experts) or dict(experts.named_parameters()))
    function = ("its own `_apply_gate`" if own_gate else f"{'gated' if gated else 'plain'}, {type(act_fn).__name__}")
    biases = ", biases" if hasattr(experts, "down_proj_bias") else ""
    if swap_class(experts) is ExpertMajorExperts:
        biases += "; every expert on every token (expert-major), run sparsely"
    if swap_class(experts) is IdentityExperts:
        biases += "; identity experts past its experts (`zero_expert_num`), run on each token's rank"
    if swap_class(experts) is SelfRoutingExperts:
        biases += "; routes itself from the router's logits (its own top-k), `fc1`/`fc2` as gate_up/down"
    paths = sorted({re.sub(r"\.\d+\.", ".N.", b.path) for b in blocks})
    router = type(blocks[0].router).__name__ if blocks[0].router is not None else "none"
    return InPlaceOutcome(model_type, name, True, f"`{'`, `'.join(paths)}`; router {router}; "
                          f"{type(experts).__name__}: {function}{biases}")


def in_place_markdown() -> str:
    rows = in_place_survey()
    proven = [o for o in rows if o.in_place]
    refused = [o for o in rows if not o.in_place]
    title = (f"Installed transformers {transformers.__version__}: {len(rows)} MoE causal-LM families (a config field "
             f"counts experts), {len(proven)} continue in place (each proven on its probe), {len(refused)} cannot.")
    return two_tables(title, ("Continued in place", "sparse blocks; router; experts and expert function", proven),
                      ("Not continued in place", "reason", refused))
