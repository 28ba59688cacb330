"""Settings as values: a RunConfig rebuilt from run_config.json, a value written as command-line text, the checks of
values that every section's own check shares (an empty text, a count below its minimum), and a problem that settings
no flag gave caused, told with where they came from."""

from __future__ import annotations

import dataclasses
import re

from .config import SECTION_TYPES, ConfigError, RunConfig


def config_from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from run_config.json's nested dict; unknown sections or keys are refused."""
    unknown = set(values) - set(SECTION_TYPES)
    problems = [f"unknown section {name!r}; expected one of {sorted(SECTION_TYPES)}" for name in sorted(unknown)]
    sections = {}
    for section, cls in SECTION_TYPES.items():
        given = values.get(section, {})
        names = {f.name for f in dataclasses.fields(cls)}
        problems += [f"unknown key {section}.{k}" for k in sorted(set(given) - names)]
        sections[section] = cls(**{k: v for k, v in given.items() if k in names})
    if problems:
        raise ConfigError(problems)
    return RunConfig(**sections)


def flag_text(value) -> str:
    """A setting as it is written on the command line (a list as its values separated by spaces, a bool in lower
    case)."""
    if isinstance(value, bool):
        return str(value).lower()
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def empty_strings(cfg: RunConfig) -> list[str]:
    """Flags given as "" (an unset shell variable: --output_dir "$OUT"): no setting takes an empty text, and some would
    quietly mean something else (the current folder, a tokenizer lookup of "")."""
    return [f"--{name} is empty (''): give a value, or leave the flag out for its default (an unset shell variable?)"
            for section in cfg.to_dict().values() for name, value in section.items() if value == ""]


def too_small(section, names: tuple[str, ...], minimum: int = 1) -> list[str]:
    """One problem per field of ``section`` named in ``names`` whose value (when set) is below ``minimum``."""
    return [f"{name} ({getattr(section, name)}) must be >= {minimum}" for name in names
            if getattr(section, name) is not None and getattr(section, name) < minimum]


def with_source(problem: str, inherited: dict, whose: str) -> str:
    """A problem that settings no flag gave caused (``inherited``: name -> value, taken from a checkpoint or a resumed
    run's record), saying where they came from: the settings it names (all inherited ones when it names none), then
    ``whose`` ("the resumed run's setting, from .../run_config.json"), not a flag the user passed."""
    named = [name for name in inherited if re.search(rf"\b{name}\b", problem)] or list(inherited)
    values = ", ".join(f"{name} {flag_text(inherited[name])}" for name in named)
    return f"{problem} ({values}: {whose}, not a flag you passed)"
