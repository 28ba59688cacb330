"""A folder that MoETrainer saved, read for export (docs/hf-trainer.md): a Trainer checkpoint (``checkpoint-N/``), a
``save_model()`` folder, or the run's output_dir (its newest checkpoint-N).

It holds ``moe_config.json`` (the MoE settings and layout), ``config.json`` (the dense model's HF config, which the
conversion keeps), the tokenizer when the Trainer had one (``processing_class``), and the weights: the DeepSpeed
checkpoint its ``latest`` file names (``global_step*/``, one file per expert) when DeepSpeed trained it, else
``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig
from transformers.trainer_utils import get_last_checkpoint

from ..config import MoEConfig
from ..models.architectures import architecture_of_config
from ..moe.layout import MoELayout
from ..moe.saved_settings import SETTINGS_FILE, read_settings
from .weights import ExpertWeights, deepspeed_weights, has_safetensors, safetensors_weights

DEEPSPEED_LATEST = "latest"


def trainer_folder(path: Path) -> Path | None:
    """``path`` when MoETrainer saved it; for a Trainer output_dir, its newest checkpoint-N; else None."""
    if (path / SETTINGS_FILE).is_file():
        return path
    newest = get_last_checkpoint(str(path)) if path.is_dir() else None
    return Path(newest) if newest and (Path(newest) / SETTINGS_FILE).is_file() else None


def read_trainer_folder(folder: Path) -> tuple[MoEConfig, PretrainedConfig, MoELayout]:
    """The MoE settings, the dense model's config and the MoE layout; a ValueError naming what is missing."""
    missing = [str(folder / name) for name in ("config.json", "tokenizer_config.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: a folder MoETrainer saved holds the model's config.json, and "
                         "its tokenizer when the Trainer was given one; pass processing_class=tokenizer to "
                         "MoETrainer, or save the tokenizer into the folder (tokenizer.save_pretrained(folder))")
    moe, layout = read_settings(folder)
    return moe, AutoConfig.from_pretrained(folder), layout


def trainer_folder_weights(folder: Path, tag: str | None, dense: PretrainedConfig, moe: MoEConfig,
                           layout: MoELayout) -> tuple[dict, ExpertWeights]:
    """The weights (hf/weights.py): the DeepSpeed checkpoint ``tag`` (default: the one ``latest`` names) when the
    folder holds one, else its model.safetensors."""
    arch = architecture_of_config(dense)
    if tag or (folder / DEEPSPEED_LATEST).is_file():
        tag_dir = folder / (tag or (folder / DEEPSPEED_LATEST).read_text().strip())
        if not tag_dir.is_dir():
            raise ValueError(f"{tag_dir} not found: pass --tag with a global_step* folder of {folder}")
        return deepspeed_weights(folder, tag_dir, arch, layout)
    if not has_safetensors(folder):
        raise ValueError(f"{folder} holds neither a DeepSpeed checkpoint (a `latest` file and global_step*/) nor "
                         "model.safetensors: export a checkpoint-N folder of the run")
    return safetensors_weights(folder, arch, layout, moe.ep_size)
