"""The MoE settings a converted model was built with, and its MoE layout: kept on the model by ``convert_to_moe``, so
that a trainer (MoETrainer) reads them from the model itself and writes them beside the weights it saves (as a run
record: run/folder.py), where export finds the MoE shape without the script that trained it."""

from __future__ import annotations

from torch import nn

from ..run.config import MoEConfig
from ..run.moe_layout import MoELayout

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
