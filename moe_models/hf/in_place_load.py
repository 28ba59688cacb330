"""An HF MoE folder continued in place (hf/in_place.py), read so that each rank holds only its experts.

The model is built in its own class on the meta device, its experts are swapped for this rank's ``FusedExperts``
(still on the meta device), and then every parameter is read from the folder's safetensors files: the non-expert
weights whole, and for each sparse block only the slices of this rank's experts. No rank materialises every expert.

Two layouts of the experts are read:
- fused, under the model's own names (``...experts.gate_up_proj`` [E, 2F, D]): the rank's rows of each tensor;
- the hub's per-expert layout that transformers converts when it loads (``...experts.{e}.gate_proj.weight``,
  Mixtral's ``w1``/``w3``/``w2``...; its checkpoint conversion mapping names them, and its renames such as
  Mixtral's ``block_sparse_moe`` -> ``mlp``): the rank's experts' tensors, gate and up concatenated as transformers
  does (``MergeModulelist`` then ``Concatenate(dim=1)``).

LongCat-Flash's gate_up_proj rows past its experts' (one per identity expert, used by none) are read into a buffer
of their block (``_load_idle_rows``), zeros where the folder holds none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming

from ..moe.fused_experts import FusedExperts
from .in_place import EXPERTS_NAME, IDLE_GATE_UP_ROWS, sparse_blocks, swap_experts
from .load import SafetensorsFolder, fill_meta_parameters

INDEX = "model.safetensors.index.json"
# The hub's per-expert tensors of each fused parameter when transformers' mapping names none: (gate, up) and down.
PER_EXPERT = {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",)}


def load_in_place(folder: str | Path, ep_size: int = 1, ep_rank: int | None = None,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``folder`` (an HF MoE class's config.json and safetensors) in its own class, each sparse block's
    experts swapped for this rank's ``FusedExperts`` (``ep_rank``: default, this rank's place in DeepSpeed's
    expert-parallel group of ``ep_size``), every weight read from the folder: this rank's experts only. A ValueError
    names a missing shard, a missing tensor, or a tensor whose shape the config does not give."""
    folder = Path(folder)
    _check_shards(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    swap_experts(model, ep_size, ep_rank)
    reader = SafetensorsFolder(folder, config.model_type)
    names = CheckpointNames(config.model_type, reader, model.base_model_prefix)
    fill_meta_parameters(model, lambda name: _tensor(model, reader, names, name))
    _load_buffers(model, reader, names)
    _load_idle_rows(model, reader, names)
    return model


class CheckpointNames:
    """The checkpoint's name of a model tensor, and the hub's per-expert names of a fused expert parameter, from
    transformers' conversion mapping of the family (its plain renames and its expert merges) and the class's
    ``base_model_prefix`` (a multimodal checkpoint holds the causal LM under it, as Llama 4's
    ``language_model.model.layers...``, which transformers' loading strips too)."""

    def __init__(self, model_type: str, reader: SafetensorsFolder, prefix: str = ""):
        self.reader, self.prefix = reader, prefix
        self.renames: list[tuple[str, str]] = []   # (model's part, checkpoint's part)
        self.per_expert = dict(PER_EXPERT)
        for transform in get_checkpoint_conversion_mapping(model_type) or []:
            sources, targets = transform._original_source_patterns, transform._original_target_patterns
            literal = [_literal(p) for p in sources + targets]
            if isinstance(transform, WeightRenaming) and all(literal):  # GraniteMoeHybrid: `router\.layer\.weight`
                self.renames.append((literal[len(sources)], literal[0]))
            merged = re.fullmatch(r"(?:.*\.)?experts\.(gate_up_proj|down_proj|up_proj)", targets[0])
            if isinstance(transform, WeightConverter) and len(targets) == 1 and merged and \
                    all(".experts.*." in f".{s}" for s in sources):
                self.per_expert[merged.group(1)] = tuple(s.split(".*.", 1)[1] for s in sources)

    def of(self, name: str) -> str:
        """The checkpoint's name of model tensor ``name``: itself, or renamed as the family's mapping does."""
        candidates = [name] + [name.replace(model_part, checkpoint_part)
                               for model_part, checkpoint_part in self.renames if model_part in name]
        if self.prefix:
            candidates += [f"{self.prefix}.{candidate}" for candidate in candidates]
        return next((c for c in candidates if self.reader.has(c)), name)


def _literal(pattern: str) -> str | None:
    """The name a rename pattern matches when it is a plain one (dots escaped or not), else None."""
    text = pattern.replace("\\.", ".")
    return text if re.fullmatch(r"[\w.]+", text) else None


def _check_shards(folder: Path) -> None:
    index = folder / INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{folder}: {INDEX} names shard {missing[0]}, which is not in the folder; copy the "
                             "whole checkpoint (every shard the index names)")


def _tensor(model: nn.Module, reader: SafetensorsFolder, names: CheckpointNames, name: str) -> torch.Tensor:
    """A parameter's value: an expert parameter's rows of this rank (fused layout) or its experts' tensors merged
    (per-expert layout); any other parameter whole."""
    holder, _, attr = name.rpartition(".")
    experts_path, marker, _ = holder.partition(".deepspeed_moe.")
    if not marker:
        return reader.tensor(names.of(name))
    module = model.get_submodule(experts_path)
    assert isinstance(module, FusedExperts)
    rows = _expert_rows(reader, names, experts_path, attr, module.global_expert_ids(),
                        module.experts.stacked_names()[attr])
    if rows is None:
        per_expert = names.per_expert.get(attr)
        first = f"{experts_path}.{module.global_expert_ids().start}.{per_expert[0]}" if per_expert else attr
        fused = names.of(f"{experts_path}.{module.experts.stacked_names()[attr]}")
        raise ValueError(f"{reader.folder} has neither {fused!r} (fused experts) nor "
                         f"{names.of(first)!r} (one tensor per expert); is it a complete {reader.moe_type} "
                         "checkpoint of this config?")
    return rows


def _expert_rows(reader: SafetensorsFolder, names: CheckpointNames, experts_path: str, attr: str,
                 ids: range, family_name: str | None = None) -> torch.Tensor | None:
    """Rows ``ids`` of fused expert parameter ``attr`` (``family_name`` in the family's module, default the same):
    of the fused tensor, or the experts' tensors merged; None when the folder holds neither."""
    fused = names.of(f"{experts_path}.{family_name or attr}")
    if reader.has(fused):
        return reader.slice(fused)[ids.start:ids.stop]
    per_expert = names.per_expert.get(attr)
    if not per_expert or not reader.has(names.of(f"{experts_path}.{ids.start}.{per_expert[0]}")):
        return None
    parts = [torch.stack([reader.tensor(names.of(f"{experts_path}.{e}.{suffix}")) for e in ids])
             for suffix in per_expert]
    return torch.cat(parts, dim=1)


def _load_idle_rows(model: nn.Module, reader: SafetensorsFolder, names: CheckpointNames) -> None:
    """Each block's gate_up_proj rows past its experts' (LongCat-Flash's, a row per identity expert: hf/in_place.py's
    ``IDLE_GATE_UP_ROWS``), read from the folder, or zeros where it holds none (the hub's checkpoints of the family
    hold no weights for its identity experts; no route uses these rows)."""
    for found in sparse_blocks(model):
        idle = getattr(found.block, IDLE_GATE_UP_ROWS, None)
        if idle is None:
            continue
        experts = found.experts.num_experts
        rows = _expert_rows(reader, names, f"{found.path}.{EXPERTS_NAME}", "gate_up_proj",
                            range(experts, experts + idle.shape[0]))
        found.block.register_buffer(IDLE_GATE_UP_ROWS, rows.to(idle.dtype) if rows is not None
                                    else torch.zeros(idle.shape, dtype=idle.dtype))


def _load_buffers(model: nn.Module, reader: SafetensorsFolder, names: CheckpointNames) -> None:
    """Persistent buffers the checkpoint holds (a router's correction bias), in place."""
    persistent = model.state_dict().keys()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            checkpoint_name = names.of(name)
            if name in persistent and reader.has(checkpoint_name):
                buffer.copy_(reader.tensor(checkpoint_name))

