"""A folder that MoETrainer saved, read for export (docs/hf-trainer.md): a Trainer checkpoint (``checkpoint-N/``), a
``save_model()`` folder, or the run's output_dir (its newest checkpoint-N).

It holds the record of its MoE settings and layout (run/folder.py: ``run_config.json``, or ``moe_config.json`` when
saved by an earlier version), ``config.json`` (the dense model's HF config, which the
conversion keeps), the tokenizer when the Trainer had one (``processing_class``), and the weights: the DeepSpeed
checkpoint its ``latest`` file names (``global_step*/``, one file per expert) when DeepSpeed trained it, else
``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig
from transformers.trainer_utils import get_last_checkpoint

from ..models.architectures import architecture_of_config
from ..run.checkpoint_folder import CheckpointFolder
from ..run.config import MoEConfig
from ..run.folder import RunFolder
from ..run.moe_layout import MoELayout
from .weights import ExpertWeights, deepspeed_weights, has_safetensors, safetensors_weights


def trainer_folder(path: Path) -> Path | None:
    """``path`` when MoETrainer saved it; for a Trainer output_dir, its newest checkpoint-N; else None."""
    if _is_trainer_folder(path):
        return path
    newest = get_last_checkpoint(str(path)) if path.is_dir() else None
    return Path(newest) if newest and _is_trainer_folder(Path(newest)) else None


def _is_trainer_folder(path: Path) -> bool:
    """An MoETrainer save: a record of MoE settings, and no base_model/ (a train.py run folder keeps its dense
    model's config there; an MoETrainer folder keeps the model's own config.json beside the weights)."""
    folder = RunFolder(path)
    return folder.holds_moe_settings() and not folder.base_model_dir.exists()


def read_trainer_folder(folder: Path) -> tuple[MoEConfig, PretrainedConfig, MoELayout]:
    """The MoE settings, the dense model's config and the MoE layout; a ValueError naming what is missing."""
    missing = [str(folder / name) for name in ("config.json", "tokenizer_config.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: a folder MoETrainer saved holds the model's config.json, and "
                         "its tokenizer when the Trainer was given one; pass processing_class=tokenizer to "
                         "MoETrainer, or save the tokenizer into the folder (tokenizer.save_pretrained(folder))")
    record = RunFolder(folder).record()
    if record.resolved.moe_layout is None:
        raise ValueError(f"{RunFolder(folder).record_path} holds no MoE layout: it was not saved by MoETrainer")
    return record.settings.moe, AutoConfig.from_pretrained(folder), record.resolved.moe_layout


def trainer_folder_weights(folder: Path, tag: str | None, dense: PretrainedConfig, moe: MoEConfig,
                           layout: MoELayout) -> tuple[dict, ExpertWeights]:
    """The weights (hf/weights.py): the DeepSpeed checkpoint ``tag`` (default: the one ``latest`` names) when the
    folder holds one, else its model.safetensors."""
    arch = architecture_of_config(dense)
    checkpoints = CheckpointFolder(folder)  # the Trainer's DeepSpeed checkpoint sits in the folder itself
    if tag or checkpoints.has_latest():
        tag_dir = folder / tag if tag else checkpoints.latest()
        if not tag_dir.is_dir():
            raise ValueError(f"{tag_dir} not found: pass --tag with a global_step* folder of {folder}")
        return deepspeed_weights(folder, tag_dir, arch, layout)
    if not has_safetensors(folder):
        raise ValueError(f"{folder} holds neither a DeepSpeed checkpoint (a `latest` file and global_step*/) nor "
                         "model.safetensors: export a checkpoint-N folder of the run")
    return safetensors_weights(folder, arch, layout, moe.ep_size)
