"""Continue from an HF MoE checkpoint (any class hf/adapters.py has an adapter for; exported here or anyone's): its
experts and routers (and their biases) become the DeepSpeed MoE layers' own, instead of upcycled copies of a dense
FFN.

The model is built on the meta device (accelerate's ``init_empty_weights``), then each rank reads from the
safetensors files only what it holds: the non-expert weights and its own num_experts / ep_size experts per layer.
No rank materialises every expert.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..models.architectures import architecture_of
from ..models.source import check_vocabulary
from ..moe.experts import StackedExperts
from ..moe.checks import moe_problems
from ..moe.layer import moe_layers_of
from ..moe.parallel import parallel_problems
from ..moe.saved_settings import settings_of
from ..moe.surgery import convert_to_moe
from ..run.config import ConfigError, MoEConfig
from ..run.config_values import flag_text, with_source
from ..run.moe_layout import MoELayout, resolve_moe_layers
from .adapters import ADAPTERS
from .import_config import dense_config_and_moe_settings


def is_hf_moe_folder(name_or_path: str | None) -> bool:
    """A local model folder whose config.json names an MoE class this project imports."""
    if not name_or_path or not (Path(name_or_path) / "config.json").is_file():
        return False
    return AutoConfig.from_pretrained(name_or_path).model_type in ADAPTERS


def import_hf_moe(path: str, moe: MoEConfig, vocab_needed: int, seed: int,
                  given: frozenset[str] | None = None) -> tuple[nn.Module, MoEConfig, MoELayout, int]:
    """The DeepSpeed MoE model holding the checkpoint's weights (this rank's experts only), the MoE settings it was
    built with (the checkpoint's num_experts, top_k, moe_layers and shared experts; the rest from ``moe``), its MoE
    layout, and the parameter count of its dense skeleton. Raises NotRepresentable, or ConfigError when a flag
    disagrees with the checkpoint (``given``: the flags the command line gave, see settings_from_checkpoint)."""
    checkpoint_config = AutoConfig.from_pretrained(path)
    dense_config, settings, _ = dense_config_and_moe_settings(checkpoint_config)
    moe = settings_from_checkpoint(moe, settings, dense_config.num_hidden_layers, given, Path(path) / "config.json")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(dense_config, dtype=torch.float32)
        check_vocabulary(model, vocab_needed)
        dense_parameters = sum(p.numel() for p in model.parameters())
        # Built on the meta device: every expert weight is read from the checkpoint below. The import's expert_init
        # is "copy" or, where its dense blocks are wider than its experts, "granular" (which gives them their width).
        model = convert_to_moe(model, moe, seed=seed)
    layout = settings_of(model)[1]
    reader = SafetensorsFolder(Path(path), checkpoint_config.model_type)
    layers = moe_layers_of(model)
    adapter, arch = ADAPTERS[checkpoint_config.model_type], architecture_of(model)
    sources = adapter.deepspeed_sources(arch, layout, lambda moe_layer_id: layers[moe_layer_id].global_expert_ids())
    fill_meta_parameters(model, lambda name: checkpoint_tensor(model, reader, sources, name))
    for layer, block_id in zip(layers, layout.blocks):
        load_score_bias(layer.router, adapter.read_score_bias(reader, arch.ffn_path(block_id)))
    return model, moe, layout, dense_parameters


@torch.no_grad()
def load_score_bias(router, bias: torch.Tensor | None) -> None:
    """The checkpoint's router bias (GLM4-MoE's, ERNIE-4.5-MoE's e_score_correction_bias; None: the class has none)
    into the router's aux-loss-free bias, added where the run does not update it (it then stays as the checkpoint
    has it; the imported settings route by the scored rule, which reads it)."""
    if bias is None:
        return
    if router.score_bias is None:
        router.add_score_bias(router.wg.weight.device)
    router.score_bias.copy_(bias)


def settings_from_checkpoint(moe: MoEConfig, checkpoint: dict, num_layers: int,
                             given: frozenset[str] | None = None, source: Path | str = "its config.json") -> MoEConfig:
    """``moe`` with the checkpoint's num_experts, top_k, moe_layers and shared experts. A flag the user gave
    (``given``, the command line's flags; None: a value other than the default counts as given) with another value
    is refused with both values, as are flags that have no meaning for an import; the others take the checkpoint's.
    What the flags then do not go with (moe_problems, parallel_problems) is refused here, each problem saying which
    setting came from the checkpoint (``source``, its config.json), not from a flag."""
    defaults, problems = MoEConfig(), []

    def was_given(name: str) -> bool:
        return name in given if given is not None else getattr(moe, name) != getattr(defaults, name)

    for name, value in checkpoint.items():
        wanted = getattr(moe, name)
        same = (resolve_moe_layers(wanted, num_layers) == resolve_moe_layers(value, num_layers) if name == "moe_layers"
                else wanted == value)
        if was_given(name) and not same:
            problems.append(f"--{name} {flag_text(wanted)} disagrees with the imported checkpoint, which has "
                            f"{name} {flag_text(value)}; drop the flag (or pass --{name} {flag_text(value)}) to "
                            "continue the checkpoint's model")
    if moe.use_residual:
        problems.append("--use_residual: an imported checkpoint has no residual dense FFN; drop the flag")
    if was_given("expert_init"):
        problems.append(f"--expert_init {moe.expert_init}: an import reads its experts from the checkpoint; drop the flag")
    if problems:
        raise ConfigError(problems)
    merged = dataclasses.replace(moe, **checkpoint)
    inherited = {name: value for name, value in checkpoint.items() if not was_given(name)}
    whose = f"the imported checkpoint's setting, from {source}"
    problems = [with_source(problem, inherited, whose) for problem in settings_problems(merged)
                if problem not in settings_problems(moe)]  # the flags' own problems were refused before
    if problems:
        raise ConfigError(problems)
    return merged


def settings_problems(moe: MoEConfig) -> list[str]:
    return moe_problems(moe) + parallel_problems(moe)





class SafetensorsFolder:
    """Single tensors, or slices of them, read lazily from a folder of safetensors files (sharded or not)."""

    def __init__(self, folder: Path, moe_type: str):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{folder} holds no *.safetensors files; the importer reads safetensors weights only "
                             "(save_pretrained writes them)")
        self.folder, self.moe_type = folder, moe_type
        self._file_of = {name: handle for handle in (safe_open(str(f), framework="pt") for f in files)
                         for name in handle.keys()}

    def has(self, name: str) -> bool:
        return name in self._file_of

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def slice(self, name: str):
        """A lazy view: indexing it reads only the indexed part from disk."""
        return self._handle(name).get_slice(name)

    def _handle(self, name: str):
        if name not in self._file_of:
            raise ValueError(f"{self.folder} has no tensor {name!r}; is it a complete {self.moe_type} checkpoint?")
        return self._file_of[name]


def checkpoint_tensor(model: nn.Module, reader: SafetensorsFolder, sources: dict[str, Callable],
                      name: str) -> torch.Tensor:
    """The checkpoint's tensor for the DeepSpeed model's parameter ``name``: routers and experts by the family
    adapter's ``sources`` (under their state-dict names), every other parameter under the same name."""
    holder, _, attr = name.rpartition(".")
    if attr in StackedExperts.STACKED and isinstance(model.get_submodule(holder), StackedExperts):
        # the grouped path's [L, ...] parameters: the local experts' tensors, stacked
        keys = model.get_submodule(holder).per_expert_keys(attr)
        return torch.stack([sources[f"{holder}.{key}"](reader) for key in keys])
    return sources[name](reader) if name in sources else reader.tensor(name)


def fill_meta_parameters(model: nn.Module, tensor_for: Callable[[str], torch.Tensor]) -> None:
    """Replace every meta-device parameter by ``tensor_for(its name)``, cast to the parameter's dtype.

    Written here because ``Module.to_empty``, ``load_state_dict(assign=True)`` and accelerate's
    ``set_module_tensor_to_device`` all make new Parameter objects without the attributes libraries hang on them
    (DeepSpeed marks expert parameters with ``allreduce``/``group_name``, which its optimizer groups need);
    these are copied over. Tied parameters stay one parameter.
    """
    if isinstance(model, PreTrainedModel):
        model.tie_weights()  # meta init leaves tied parameters as separate objects
    filled: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters():  # a shared parameter once, under its first name
        if not param.is_meta:
            continue
        value = tensor_for(name)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"checkpoint tensor for {name} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(param.shape)}")
        new = nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)
        filled[id(param)] = new
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None and id(param) in filled:
                module._parameters[attr] = filled[id(param)]

