"""Reading a folder's safetensors into a model built on the meta device (accelerate's ``init_empty_weights``): each
rank reads only the tensors, or the slices of them, that it holds (hf/in_place_load.py reads a rank's experts so).
No rank materialises every expert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel


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

