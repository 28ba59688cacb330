"""The DeepSpeed JSON config of a run: a shipped or user file whose "auto" values come from the run's flags.

transformers fills "auto" the same way for its Trainer (HfTrainerDeepSpeedConfig), but only from a
TrainingArguments object; our flags live in TrainConfig, so the (small) mapping is written here.
Each setting has one source of truth: a value written in the JSON that disagrees with its flag is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

from ..moe.parallel import parallel_problems
from ..run.config import ConfigError, RunConfig

# The shipped configs are package data: found from an installed package as from a source checkout.
SHIPPED_DIR = Path(__file__).resolve().parent / "ds_configs"


def resolve_deepspeed_config_path(name_or_path: str) -> Path:
    """'zero2' -> the shipped zero2.json; an existing path is returned as is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(name_or_path)


def shipped_deepspeed_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def deepspeed_config_problems(name_or_path: str) -> list[str]:
    """Whether ``--deepspeed`` names a file or a shipped config (its contents are checked by
    ``build_deepspeed_config``)."""
    try:
        resolve_deepspeed_config_path(name_or_path)
    except FileNotFoundError:
        return [f"deepspeed config {name_or_path!r} is neither a file nor a shipped config "
                f"({', '.join(shipped_deepspeed_configs())})"]
    return []


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def flag_values(cfg: RunConfig, world_size: int) -> dict[tuple[str, ...], tuple[str, Any]]:
    """JSON key path -> (flag that owns it, value)."""
    t = cfg.train
    return {
        ("train_micro_batch_size_per_gpu",): ("per_device_train_batch_size", t.per_device_train_batch_size),
        ("gradient_accumulation_steps",): ("gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("train_batch_size",): ("per_device_train_batch_size x gradient_accumulation_steps x world size",
                                t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size),
        ("gradient_clipping",): ("max_grad_norm", t.max_grad_norm),
        ("optimizer", "params", "lr"): ("learning_rate", t.learning_rate),
        ("optimizer", "params", "weight_decay"): ("weight_decay", t.weight_decay),
        ("scheduler", "params", "total_num_steps"): ("max_steps", t.max_steps),
        ("scheduler", "params", "warmup_num_steps"): ("warmup_steps", t.warmup_steps),
        ("scheduler", "params", "cos_min_ratio"): ("min_lr_ratio", t.min_lr_ratio),
        ("bf16", "enabled"): ("the device (bf16 on GPUs that support it)", _bf16_available()),
    }


def bf16_follows_the_device(deepspeed: str) -> bool:
    """Whether the DeepSpeed JSON leaves bf16 to the machine (``"bf16": {"enabled": "auto"}``, the shipped ones do)."""
    try:
        bf16 = json.loads(resolve_deepspeed_config_path(deepspeed).read_text()).get("bf16")
    except (OSError, ValueError, AttributeError):
        return False  # validate reports an unreadable JSON
    return isinstance(bf16, dict) and bf16.get("enabled") == "auto"


def build_deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """Load cfg.train.deepspeed and fill its "auto" values; raise ConfigError on conflicts or bad settings."""
    path = resolve_deepspeed_config_path(cfg.train.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError([f"deepspeed config {str(path)!r} is not valid JSON: {err}; fix the file (a JSON "
                           "object, no trailing commas or comments) or pass a shipped config (--deepspeed zero2)"]) \
            from None
    if not isinstance(ds, dict):
        raise ConfigError([f"deepspeed config {str(path)!r} holds a JSON {type(ds).__name__}; it must be one JSON "
                           "object ({\"zero_optimization\": ..., \"optimizer\": ...})"])
    problems = component_problems(ds, path.name)
    for keys, (flag, value) in flag_values(cfg, world_size).items():
        parent = ds
        for key in keys[:-1]:
            parent = parent.get(key)
            if not isinstance(parent, dict):
                break
        if not isinstance(parent, dict) or keys[-1] not in parent:
            continue
        current = parent[keys[-1]]
        if current == "auto":
            parent[keys[-1]] = value
        elif current != value and keys != ("bf16", "enabled"):
            problems.append(f"{path.name}: {'.'.join(keys)} is {current!r} but {flag} gives {value!r}; "
                            f"write \"auto\" in the JSON (the flag then decides) or pass a matching flag")
    problems += [f"{path.name}: {problem}" for problem in parallel_problems(cfg.moe, zero_stage=zero_stage(ds))]
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        problems.append(f"{path.name}: no flag fills {', '.join(leftover)}; write a value instead of \"auto\"")
    if problems:
        raise ConfigError(problems)
    return ds


def component_problems(ds: dict, file_name: str) -> list[str]:
    """The optimizer and scheduler types must be ones DeepSpeed builds (its own or a torch.optim class)."""
    problems = []
    optimizer = _type_of(ds, "optimizer")
    if optimizer is not None and not _known_optimizer(optimizer):
        problems.append(f"{file_name}: optimizer.type {optimizer!r} is not an optimizer DeepSpeed knows; use one of "
                        f"{', '.join(DEEPSPEED_OPTIMIZERS)} (DeepSpeed's) or a torch.optim class name such as AdamW")
    scheduler = _type_of(ds, "scheduler")
    if scheduler is not None and scheduler not in VALID_LR_SCHEDULES:
        problems.append(f"{file_name}: scheduler.type {scheduler!r} is not a DeepSpeed schedule; use one of "
                        f"{', '.join(VALID_LR_SCHEDULES)} (the shipped configs use WarmupCosineLR)")
    return problems


def _type_of(ds: dict, section: str):
    return ds[section].get("type") if isinstance(ds.get(section), dict) else None


def _known_optimizer(name) -> bool:
    """What DeepSpeed's engine accepts: its own names in any letter case, or a torch.optim class."""
    return isinstance(name, str) and (name.lower() in DEEPSPEED_OPTIMIZERS or hasattr(torch.optim, name))


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed JSON asks for (0 without a zero_optimization section)."""
    section = ds_config.get("zero_optimization")
    return section.get("stage", 0) if isinstance(section, dict) else 0


def training_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the engine trains in: bf16 when the resolved DeepSpeed config enables it, else fp32. The dense
    model is loaded and converted in it, so a bf16 run never holds fp32 copies of its weights."""
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
