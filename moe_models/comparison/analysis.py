"""The payoff's numbers from eval curves: when an MoE reaches the dense run's final loss, and losses at equal FLOPs.
FLOPs are the ones each run actually spent (its metrics' ``flops_per_token_spent`` per logging interval: routes to
null experts, past top-p's cut or dropped by capacity cost nothing), not top_k x the expert FLOPs.

A curve is a run's eval points, (x, eval loss) sorted by x, where x is the step or the training FLOPs. Between two
evals the loss is taken as linear in x: the only honest reading of a curve sampled every eval_steps, and the report
says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Curve = list[tuple[float, float]]


@dataclass(frozen=True)
class Crossing:
    """Where a curve first reaches a target loss: ``x`` interpolated between the evals around the crossing;
    ``at_first_eval`` when the first eval already reached it (so x is an upper bound); x None when never reached."""

    x: float | None
    at_first_eval: bool = False


def first_reaching(curve: Curve, target: float) -> Crossing:
    """The first x at which the curve's loss is <= ``target``, interpolated linearly between the last eval above the
    target and the first at or below it."""
    for i, (x, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return Crossing(x, at_first_eval=True)
            x0, loss0 = curve[i - 1]
            return Crossing(x0 + (loss0 - target) / (loss0 - loss) * (x - x0))
    return Crossing(None)


def loss_at(curve: Curve, x: float) -> float | None:
    """The curve's loss at ``x``, interpolated linearly between the evals around it; None outside the curve."""
    for (x0, loss0), (x1, loss1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return loss0 if x1 == x0 else loss0 + (x - x0) / (x1 - x0) * (loss1 - loss0)
    return curve[0][1] if len(curve) == 1 and curve[0][0] == x else None


# FLOPs per token along a run: consecutive pieces (last step of the piece, FLOPs per token in it) from step 0; the last
# piece also covers any step after it. A run of one model at its planned cost is [(inf, F)].
FlopsSchedule = list[tuple[float, float]]


def training_flops(step: float, schedule: FlopsSchedule, tokens_per_step: float) -> float:
    """FLOPs spent on training to ``step``: tokens_per_step x the sum over the schedule's pieces of (steps of the
    piece up to ``step``) x its FLOPs per token."""
    spent, start = 0.0, 0.0
    for i, (end, flops_per_token) in enumerate(schedule):
        upto = step if i == len(schedule) - 1 else min(step, end)
        spent += max(upto - start, 0.0) * flops_per_token
        if step <= end:
            break
        start = end
    return spent * tokens_per_step


def realised_schedule(train_rows: list[dict], planned: float, start: float = 0.0) -> FlopsSchedule:
    """The FLOPs per token each logging interval actually spent: a piece per training row (from the previous row's
    step, or ``start``, to its own) at its ``flops_per_token_spent`` (the experts the tokens ran, metrics.jsonl),
    ``planned`` for a row without it (a dense run's); [(inf, planned)] without rows."""
    rows = sorted((r for r in train_rows if r["step"] > start), key=lambda r: r["step"])
    return [(r["step"], r.get("flops_per_token_spent", planned)) for r in rows] or [(math.inf, planned)]


def equal_added_flops(upcycled: Curve, continued: Curve) -> tuple[float, float, float] | None:
    """Both curves over FLOPs added since the switch (each starting at 0): (X, upcycled loss at X, continued loss at
    X) at X = the smaller of the two runs' total added FLOPs, so that neither is read beyond its last eval."""
    if not upcycled or not continued:
        return None
    x = min(upcycled[-1][0], continued[-1][0])
    a, b = loss_at(upcycled, x), loss_at(continued, x)
    return None if a is None or b is None else (x, a, b)
