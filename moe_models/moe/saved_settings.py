"""The MoE settings a converted model was built with: kept on the model by ``convert_to_moe`` and written beside its
weights as ``moe_config.json``, so that a trainer reads the router losses and balancing from the model itself, and
export finds the MoE shape of a checkpoint folder without the script that trained it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..config import ConfigError, MoEConfig, config_from_dict
from .layout import MoELayout

SETTINGS_FILE = "moe_config.json"
_ATTRIBUTE = "moe_settings"


def attach_settings(model: nn.Module, moe: MoEConfig, layout: MoELayout) -> None:
    """Record on ``model`` the settings and layout its MoE layers were built with."""
    setattr(model, _ATTRIBUTE, (moe, layout))


def settings_of(model: nn.Module) -> tuple[MoEConfig, MoELayout]:
    """The (MoEConfig, MoELayout) ``convert_to_moe`` recorded on ``model``; a ValueError saying how to get them when
    the model was not converted."""
    settings = getattr(model, _ATTRIBUTE, None)
    if settings is None:
        raise ValueError(f"{type(model).__name__} was not converted by moe_models.convert_to_moe, so it has no MoE "
                         "settings: convert it first, `model = convert_to_moe(model, MoEConfig(...))`")
    return settings


def write_settings(folder: Path, moe: MoEConfig, layout: MoELayout) -> Path:
    """``folder/moe_config.json``: every MoE setting and the resolved layout."""
    path = Path(folder) / SETTINGS_FILE
    values = {"moe": dataclasses.asdict(moe), "moe_layout": layout.to_dict()}
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


def read_settings(folder: Path) -> tuple[MoEConfig, MoELayout]:
    """What ``write_settings`` wrote in ``folder``; a ValueError naming the file when it is missing or malformed."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: the folder was not saved by MoETrainer, which writes it beside the "
                         "weights of every checkpoint")
    try:
        values = json.loads(path.read_text())
        return config_from_dict({"moe": values["moe"]}).moe, MoELayout.from_dict(values["moe_layout"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
        raise ValueError(f"{path} is not a valid MoE settings file ({err}); copy it from the run's other "
                         "checkpoints, whose settings are the same") from None
