"""The payoff's horizon: tokens seen per parameter, of the dense model (a) and of the MoE's (b) active and total
parameters, and whether the run is long enough to judge.

Below MIN_TOKENS_PER_DENSE_PARAMETER tokens per parameter of the dense model the verdicts are marked "too short to
judge": at 1.2 tokens per parameter the payoff found the dense model ahead of the MoE, at 12 the MoE ahead by 0.10
nats, and its lead was still growing (docs/payoff.md, where the threshold is explained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..run.config import RunConfig
from ..training.preflight import model_shape

MIN_TOKENS_PER_DENSE_PARAMETER = 10.0
TOO_SHORT = "too short to judge"


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of the payoff's models: all of the dense model's (a), and the MoE's (b) active ones (those
    one token's forward multiplies by, experts counted top_k times: metrics/throughput.py) and all of them."""

    dense: int
    moe_active: int
    moe_total: int


def model_parameters(moe: RunConfig, dense: RunConfig) -> Parameters:
    """The counts of the models ``moe`` (b) and ``dense`` (a) build, measured on the meta device
    (training/preflight.py)."""
    moe_shape, dense_shape = model_shape(moe), model_shape(dense)
    return Parameters(dense=dense_shape.dense_parameters + dense_shape.expert_parameters,
                      moe_active=moe_shape.active_parameters,
                      moe_total=moe_shape.dense_parameters + moe_shape.expert_parameters)


def horizon(parameters: Parameters, max_steps: int, tokens_per_step: int) -> dict:
    """Tokens seen by a run of ``max_steps`` per parameter of each count; ``too_short`` below the threshold of
    tokens per dense parameter, with the steps that reach it: ceil(threshold x dense parameters / tokens per step)."""
    tokens = max_steps * tokens_per_step
    counts = {"dense": parameters.dense, "moe_active": parameters.moe_active, "moe_total": parameters.moe_total}
    per_dense = tokens / parameters.dense
    return {"max_steps": max_steps, "tokens_per_step": tokens_per_step, "tokens": tokens, "parameters": counts,
            "tokens_per_parameter": {name: tokens / count for name, count in counts.items()},
            "min_tokens_per_dense_parameter": MIN_TOKENS_PER_DENSE_PARAMETER,
            "too_short": per_dense < MIN_TOKENS_PER_DENSE_PARAMETER,
            "steps_to_threshold": math.ceil(MIN_TOKENS_PER_DENSE_PARAMETER * parameters.dense / tokens_per_step)}


def horizon_text(h: dict) -> str:
    """One line: the tokens per parameter, and whether the horizon is long enough to judge."""
    per, count = h["tokens_per_parameter"], h["parameters"]
    text = (f"{h['tokens']:,} tokens per run ({h['max_steps']:,} steps of {h['tokens_per_step']:,}): "
            f"{per['dense']:.2f} tokens per parameter of the dense model ({count['dense']:,} parameters), "
            f"{per['moe_active']:.2f} per active and {per['moe_total']:.2f} per total parameter of the MoE "
            f"({count['moe_active']:,} and {count['moe_total']:,})")
    threshold = f"{h['min_tokens_per_dense_parameter']:g} tokens per dense parameter"
    if h["too_short"]:
        return (f"{text}; below {threshold}: {TOO_SHORT} (--max_steps {h['steps_to_threshold']} would reach "
                "it; docs/payoff.md)")
    return f"{text}; at least {threshold}, the horizon the verdicts need (docs/payoff.md)"
