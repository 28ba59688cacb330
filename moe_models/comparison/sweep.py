"""Over the cells of a payoff (one per learning rate and seed): each run's final eval loss per learning rate as mean
and spread over the seeds, each model at its best learning rate, the comparisons best against best seed by seed,
and the verdict rule.

Over the seeds' values x_1..x_n of a figure: mean = (x_1 + ... + x_n) / n, spread = min..max, and the sample
standard deviation sqrt(sum (x_i - mean)^2 / (n - 1)) beside it (n > 1). A goal is "met" only when every seed
meets it, i.e. when the spread min..max lies on the goal's side of its threshold; "not met" when no seed does;
"undecided" when the spread covers the threshold. With one seed the spread is not measured, and the verdict says so.

A verdict carries caveats: "too short to judge" below the horizon's threshold of tokens per parameter (horizon.py),
a best rate at an end of the sweep (rate_brackets.py), and for the "reaches the dense run's final loss" shares the
schedule's bias; the gap over training (gap_over_training.py) is the comparison the schedule does not bias.
"""

from __future__ import annotations

import math
from typing import Callable

from .analysis import equal_added_flops, first_reaching
from .gap_over_training import common_evals, gap_points
from .horizon import TOO_SHORT
from .rate_brackets import ONLY as ONLY_RATE, bracket, unbracketed_text
from .runs import DENSE, DENSE_CONTINUED, MOE, UPCYCLED, is_variant

MET, NOT_MET, UNDECIDED = "met", "not met", "undecided (the spread covers the threshold)"
ONE_SEED = "one seed: spread not measured"
SCHEDULE_BIASED = ("biased against the MoE by the schedule (the dense run's final loss is reached at the decayed "
                   "rate, the MoE's mid-schedule): see the gap over training at equal steps")


def spread(values: list[float]) -> dict:
    """Mean, min, max and sample standard deviation (None for one value) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "min": min(values), "max": max(values), "std": std, "n": n}


def verdict(values: list[float | None], goal: Callable[[float], bool]) -> str:
    """MET when every value meets ``goal`` (None, a figure not reached, does not), NOT_MET when none does,
    UNDECIDED otherwise."""
    met = [v is not None and goal(v) for v in values]
    found = MET if all(met) else NOT_MET if not any(met) else UNDECIDED
    return f"{found} ({ONE_SEED})" if len(values) == 1 and found != UNDECIDED else found


def summarise(cells: list[dict], horizon: dict | None = None) -> dict:
    """The sweep and the comparisons best against best, from the cells' payoff.json dicts (results.collect);
    ``horizon`` (horizon.horizon, None: not known) marks every verdict "too short to judge" when it is."""
    lrs = sorted({c["learning_rate"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    at = {(c["learning_rate"], c["seed"]): c for c in cells}
    names = list(cells[0]["runs"])
    final = {name: {lr: spread([at[lr, s]["runs"][name]["final_eval_loss"] for s in seeds]) for lr in lrs}
             for name in names}
    best = {name: min(lrs, key=lambda lr: final[name][lr]["mean"]) for name in names}
    brackets = {name: bracket(lrs, best[name]) for name in names}

    def run(name: str, seed: int) -> dict:
        return at[best[name], seed]["runs"][name]

    comparisons = [
        _compared("reached", f"share of the best {DENSE}'s steps at which the best {MOE} reaches its final eval loss",
                  [_reached_share(run(MOE, s), run(DENSE, s), at[best[DENSE], s]["max_steps"]) for s in seeds],
                  "<= 60%", lambda v: v <= 0.6, (MOE, DENSE), SCHEDULE_BIASED),
        _compared("reached_upcycled", f"the same for the best {UPCYCLED}",
                  [_reached_share(run(UPCYCLED, s), run(DENSE, s), at[best[DENSE], s]["max_steps"]) for s in seeds],
                  "<= 60%", lambda v: v <= 0.6, (UPCYCLED, DENSE), SCHEDULE_BIASED),
        _compared("moe_minus_dense", f"final eval loss, best {MOE} - best {DENSE} (same steps)",
                  [run(MOE, s)["final_eval_loss"] - run(DENSE, s)["final_eval_loss"] for s in seeds],
                  "< 0", lambda v: v < 0, (MOE, DENSE)),
        _compared("upcycled_minus_continued", f"eval loss at equal FLOPs added since the switch, best {UPCYCLED} - "
                  f"best {DENSE_CONTINUED} (the fair control)",
                  [_added_flops_difference(at[best[UPCYCLED], s], at[best[DENSE_CONTINUED], s]) for s in seeds],
                  "< 0", lambda v: v < 0, (UPCYCLED, DENSE_CONTINUED)),
        _compared("upcycled_minus_without_reset", f"the same against {DENSE} itself from the switch on (keeps its "
                  "optimizer state: not the control)",
                  [_added_flops_difference(at[best[UPCYCLED], s], at[best[DENSE], s], DENSE) for s in seeds],
                  None, None),
        _compared("moe_information", f"highest I(domain; expert) over the MoE layers (bits), best {MOE}",
                  [_information(run(MOE, s)) for s in seeds], "> 0.5", lambda v: v > 0.5, (MOE,)),
        _compared("upcycled_information", f"the same, best {UPCYCLED}",
                  [_information(run(UPCYCLED, s)) for s in seeds], "> 0.5", lambda v: v > 0.5, (UPCYCLED,)),
    ]
    comparisons += [
        _compared(f"{name}_minus_moe", f"eval loss at equal realised training FLOPs, best {name} - best {MOE}",
                  [_equal_flops_difference(run(name, s), run(MOE, s)) for s in seeds], "< 0", lambda v: v < 0,
                  (name, MOE))
        for name in names if is_variant(name)]
    for c in comparisons:
        c["caveats"] = _caveats(c, brackets, horizon) if c["verdict"] else []
    gaps = [
        _gap("moe_minus_dense", f"best {MOE} - best {DENSE}, eval loss at equal steps", seeds, cells[0],
             [gap_points(run(MOE, s)["eval"], run(DENSE, s)["eval"]) for s in seeds]),
        _gap("upcycled_minus_continued", f"best {UPCYCLED} - best {DENSE_CONTINUED}, eval loss at equal steps from "
             f"the switch (step {cells[0]['switch_step']}) on", seeds, cells[0],
             [gap_points(run(UPCYCLED, s)["eval"], run(DENSE_CONTINUED, s)["eval"], cells[0]["switch_step"])
              for s in seeds])]
    return {"learning_rates": lrs, "seeds": seeds, "final_eval_loss": {n: {repr(lr): v for lr, v in by_lr.items()}
                                                                       for n, by_lr in final.items()},
            "best_learning_rate": best, "rate_brackets": brackets, "horizon": horizon, "comparisons": comparisons,
            "gap_over_training": gaps}


def _compared(key: str, what: str, values: list[float | None], goal: str | None,
              meets: Callable[[float], bool] | None, models: tuple[str, ...] = (), bias: str | None = None) -> dict:
    measured = [v for v in values if v is not None]
    return {"key": key, "what": what, "by_seed": values, "spread": spread(measured) if measured else None,
            "goal": goal, "verdict": verdict(values, meets) if meets else None, "models": list(models),
            "bias": bias}


def _caveats(compared: dict, brackets: dict, horizon: dict | None) -> list[str]:
    """What a verdict rests on beside its figures: too short a horizon, an unbracketed best rate of a model it
    compares, the schedule's bias."""
    found = [f"{TOO_SHORT} ({horizon['tokens_per_parameter']['dense']:.2f} tokens per dense parameter, below "
             f"{horizon['min_tokens_per_dense_parameter']:g})"] if horizon and horizon["too_short"] else []
    if any(brackets[name]["edge"] == ONLY_RATE for name in compared["models"]):
        found.append("rests on one learning rate, not swept (--sweep_lrs)")
    else:
        found += [f"rests on an unbracketed best: {unbracketed_text(name, brackets[name])}"
                  for name in compared["models"] if brackets[name]["edge"] is not None]
    return found + ([compared["bias"]] if compared["bias"] else [])


def _gap(key: str, what: str, seeds: list[int], cell: dict, by_seed: list[dict[int, float]]) -> dict:
    """A gap over training (gap_over_training.py): at each eval every seed has, the tokens seen, the seeds' gaps
    and their mean and spread."""
    return {"key": key, "what": what, "seeds": seeds,
            "points": [{"step": step, "tokens": step * cell["tokens_per_step"], "by_seed": gaps, **spread(gaps)}
                       for step, gaps in common_evals(by_seed)]}


def _reached_share(moe: dict, dense: dict, dense_steps: int) -> float | None:
    """Where ``moe``'s eval curve first reaches ``dense``'s final eval loss, as a share of the dense run's steps."""
    crossing = first_reaching([(e["step"], e["eval_loss"]) for e in moe["eval"]], dense["final_eval_loss"])
    return None if crossing.x is None else crossing.x / dense_steps


def _added_flops_difference(upcycled_cell: dict, continued_cell: dict, continued: str = DENSE_CONTINUED
                            ) -> float | None:
    """Upcycled minus continued eval loss at equal FLOPs added since the switch (analysis.equal_added_flops), each
    run from its own cell."""
    n = upcycled_cell["switch_step"]

    def added(run: dict) -> list[tuple[float, float]]:
        start = next(e["training_flops"] for e in run["eval"] if e["step"] >= n)
        return [(e["training_flops"] - start, e["eval_loss"]) for e in run["eval"] if e["step"] >= n]

    compared = equal_added_flops(added(upcycled_cell["runs"][UPCYCLED]), added(continued_cell["runs"][continued]))
    return None if compared is None else compared[1] - compared[2]


def _equal_flops_difference(variant: dict, moe: dict) -> float | None:
    """A --moe_variant run's eval loss minus (b)'s at equal training FLOPs from step 0 (analysis.equal_added_flops)."""
    def over_flops(run: dict) -> list[tuple[float, float]]:
        return [(e["training_flops"], e["eval_loss"]) for e in run["eval"]]

    compared = equal_added_flops(over_flops(variant), over_flops(moe))
    return None if compared is None else compared[1] - compared[2]


def _information(run: dict) -> float | None:
    layers = (run.get("specialisation") or {}).get("layers", {})
    values = [v["mutual_information_bits"] for v in layers.values() if v["mutual_information_bits"] is not None]
    return max(values) if values else None

