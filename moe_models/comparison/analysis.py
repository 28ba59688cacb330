"""The payoff's numbers from eval curves: when an MoE reaches the dense run's final loss, and losses at equal FLOPs.

A curve is a run's eval points, (x, eval loss) sorted by x, where x is the step or the training FLOPs. Between two
evals the loss is taken as linear in x: the only honest reading of a curve sampled every eval_steps, and the report
says so.
"""

from __future__ import annotations

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


def training_flops(step: float, flops_per_token: float, tokens_per_step: float, switch: tuple[float, float] | None = None
                   ) -> float:
    """FLOPs spent on training to ``step``. ``switch`` = (N, flops_per_token before N) for a run that was another
    model (the dense one) up to step N."""
    if switch is None or step <= switch[0]:
        before = switch[1] if switch else flops_per_token
        return step * tokens_per_step * before
    n, before = switch
    return tokens_per_step * (n * before + (step - n) * flops_per_token)


def equal_added_flops(upcycled: Curve, continued: Curve) -> tuple[float, float, float] | None:
    """Both curves over FLOPs added since the switch (each starting at 0): (X, upcycled loss at X, continued loss at
    X) at X = the smaller of the two runs' total added FLOPs, so that neither is read beyond its last eval."""
    if not upcycled or not continued:
        return None
    x = min(upcycled[-1][0], continued[-1][0])
    a, b = loss_at(upcycled, x), loss_at(continued, x)
    return None if a is None or b is None else (x, a, b)
