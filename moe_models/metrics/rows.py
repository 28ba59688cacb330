"""Reading a metrics row (a line of metrics.jsonl): which MoE layers it holds values of, and one layer's values."""

from __future__ import annotations

import re


def moe_layer_ids(rows: list[dict]) -> list[int]:
    """The MoE layers (i of ``moe/layer_{i}/...``) the rows hold values of, in order."""
    found = {int(m.group(1)) for r in rows for k in r if (m := re.match(r"moe/layer_(\d+)/", k))}
    return sorted(found)


def layer_values(row: dict, layer: int) -> dict:
    """The ``moe/layer_{layer}/...`` entries of a row, keyed by their last part."""
    prefix = f"moe/layer_{layer}/"
    return {key[len(prefix):]: value for key, value in row.items() if key.startswith(prefix)}
