"""The gap over training: one run's eval loss minus another's at every eval, against the tokens seen, seed by seed
and as mean and spread over the seeds.

At equal steps the two runs have seen the same tokens under the same learning-rate schedule, at the same point of
it, so the schedule favours neither: unlike "where does the MoE reach the dense run's final loss", which sets an
MoE mid-schedule, at a rate not yet decayed, against the dense run's final loss, reached with the decayed rate.
Between evals a loss is linear in the step (analysis.loss_at), so runs evaluated at other steps are still paired.
"""

from __future__ import annotations

from .analysis import loss_at


def gap_points(first: list[dict], second: list[dict], since: int = 0) -> dict[int, float]:
    """{step: first's eval loss - second's} at each of ``first``'s evals from step ``since`` on where ``second``'s
    curve reaches (``first``, ``second``: a run's payoff.json "eval" points)."""
    curve = [(e["step"], e["eval_loss"]) for e in second]
    gaps = {}
    for e in first:
        other = loss_at(curve, e["step"]) if e["step"] >= since else None
        if other is not None:
            gaps[e["step"]] = e["eval_loss"] - other
    return gaps


def common_evals(by_seed: list[dict[int, float]]) -> list[tuple[int, list[float]]]:
    """The evals every seed has (``by_seed``: gap_points per seed), in step order, each with the seeds' gaps."""
    steps = sorted(set.intersection(*(set(gaps) for gaps in by_seed))) if by_seed else []
    return [(s, [gaps[s] for gaps in by_seed]) for s in steps]
