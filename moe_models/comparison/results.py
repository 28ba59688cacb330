"""payoff.json: the numbers of a payoff comparison, read from its runs' metrics.jsonl and run_config.json."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..data.synthetic import entropy_floor, synthetic_domains
from ..metrics.rows import layer_values, moe_layer_ids
from ..metrics.run_report import read_rows
from ..run.folder import RunFolder
from .analysis import Curve, equal_added_flops, first_reaching, realised_schedule, training_flops
from .runs import DENSE, DENSE_CONTINUED, MOE, UPCYCLED, PayoffPlan, is_variant

# The eval-row entries of a layer that say how its routes spread over the data's domains (metrics/ writes them).
DOMAIN_COUNTS, MUTUAL_INFORMATION = "domain_expert_counts", "domain_mutual_information"
MUTUAL_INFORMATION_NORMALISED = "domain_mutual_information_normalised"
DOMAIN_LOSS = "eval_loss/"  # an eval row's loss per domain: eval_loss/{domain}
REAL_K, REAL_FLOPS = "real_experts_per_token", "real_expert_flops_per_token"  # a training row's, per MoE layer


@dataclass
class RunResult:
    name: str
    label: str
    flops_per_token: float
    tokens_per_step: int
    train_rows: list[dict]
    eval_rows: list[dict]
    domains: list[str] | None

    @classmethod
    def read(cls, run_dir: Path, label: str) -> RunResult:
        record = RunFolder(run_dir).record()
        t, resolved = record.settings.train, record.resolved
        tokens_per_step = (t.per_device_train_batch_size * t.gradient_accumulation_steps
                           * record.settings.data.block_size * resolved.world_size)
        train, evals = read_rows(run_dir)
        return cls(run_dir.name, label, resolved.flops_per_token, tokens_per_step, train, evals, resolved.domains)


def collect(plan: PayoffPlan, command: list[str]) -> dict:
    """Everything payoff.md shows, as one JSON-ready dict."""
    runs = {run.name: RunResult.read(plan.run_dir(run.name), run.label) for run in plan.runs}
    dense, moe, upcycled = runs[DENSE], runs[MOE], runs[UPCYCLED]
    n = plan.switch_step
    # FLOPs as each run spent them (analysis.realised_schedule); (c) and (d) are (a), the dense model, up to step N
    schedules = {name: ([(n, dense.flops_per_token)] if name in (UPCYCLED, DENSE_CONTINUED) else [])
                 + realised_schedule(run.train_rows, run.flops_per_token, n if name in (UPCYCLED, DENSE_CONTINUED)
                                     else 0) for name, run in runs.items()}
    flops = {name: partial(training_flops, schedule=schedules[name], tokens_per_step=run.tokens_per_step)
             for name, run in runs.items()}
    # (c) and (d) are the dense run up to step N: their curves are the dense evals before N (through N for (d),
    # which is not evaluated before its first update), then their own.
    steps_curves = {DENSE: _curve(dense.eval_rows), MOE: _curve(moe.eval_rows),
                    UPCYCLED: [p for p in _curve(dense.eval_rows) if p[0] < n] + _curve(upcycled.eval_rows),
                    DENSE_CONTINUED: [p for p in _curve(dense.eval_rows) if p[0] <= n]
                    + _curve(runs[DENSE_CONTINUED].eval_rows)}
    steps_curves.update({name: _curve(run.eval_rows) for name, run in runs.items() if is_variant(name)})
    starts = {name: n if name in (UPCYCLED, DENSE_CONTINUED) else 0 for name in runs}
    return {
        "command": command,
        "learning_rate": plan.learning_rate,
        "seed": plan.seed,
        "max_steps": plan.max_steps,
        "switch_step": n,
        "eval_steps": _eval_interval(dense.eval_rows),
        "tokens_per_step": dense.tokens_per_step,
        "dense_continuation": f"(d), the control for (c), is {DENSE} resumed from its checkpoint at step {n} with "
                              "(c)'s treatment: a fresh optimizer state (--reset_optimizer), the same schedule and "
                              f"batches; {DENSE} itself from step {n} on, which keeps its optimizer state, is shown "
                              "beside it",
        "runs": {name: _run_summary(run, steps_curves[name], flops[name], starts[name]) for name, run in runs.items()},
        "variants_vs_moe": {name: _variant_vs_moe(steps_curves, flops, name) for name in runs if is_variant(name)},
        "reached_dense_final_loss": _reached(steps_curves, flops, plan.max_steps),
        "upcycled_vs_dense_continuation": _upcycled_vs_continued(steps_curves, flops, n, DENSE_CONTINUED),
        "upcycled_vs_dense_without_reset": _upcycled_vs_continued(steps_curves, flops, n, DENSE),
        "entropy_floor": _entropy_floor(plan.run_dir(DENSE)),
    }


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def _curve(eval_rows: list[dict]) -> Curve:
    return [(r["step"], r["eval_loss"]) for r in eval_rows]


def _eval_interval(eval_rows: list[dict]) -> int | None:
    steps = [r["step"] for r in eval_rows]
    return min((b - a for a, b in zip(steps, steps[1:])), default=None)


def _run_summary(run: RunResult, curve: Curve, flops, start: int) -> dict:
    timed = [r for r in run.train_rows if r["step"] > 1]  # the first row holds the warm-up of the first step
    energy = [r["joules_per_token"] for r in run.train_rows if "joules_per_token" in r]
    own_steps = curve[-1][0] - start if curve else 0  # the steps the run trained itself ((c), (d): after the switch)
    return {
        "label": run.label,
        "flops_per_token": run.flops_per_token,
        "flops_per_token_spent": (flops(curve[-1][0]) - flops(start)) / (own_steps * run.tokens_per_step)
        if own_steps > 0 else None,
        **_real_experts(run.train_rows),
        "final_step": curve[-1][0] if curve else None,
        "final_eval_loss": curve[-1][1] if curve else None,
        "training_flops": flops(curve[-1][0]) if curve else None,
        "eval": [{"step": s, "eval_loss": loss, "training_flops": flops(s)} for s, loss in curve],
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed) if timed else None,
        "step_time": statistics.median(r["step_time"] for r in timed) if timed else None,
        "joules_per_token": statistics.fmean(energy) if energy else None,
        "specialisation": _specialisation(run),
        "final_eval_loss_by_domain": {key.split("/", 1)[1]: value for key, value in run.eval_rows[-1].items()
                                      if key.startswith(DOMAIN_LOSS)} if run.eval_rows else {},
    }


def _real_experts(train_rows: list[dict]) -> dict:
    """The mean over the logged intervals of the real experts per token (mean over the MoE layers) and of the real
    expert FLOPs per token (sum over them); None for a run without MoE layers."""
    rows = [r for r in train_rows if moe_layer_ids([r])]
    if not rows or any(REAL_FLOPS not in layer_values(r, i) for r in rows for i in moe_layer_ids([r])):
        return {"real_experts_per_token": None, "real_expert_flops_per_token": None}
    return {"real_experts_per_token": statistics.fmean(statistics.fmean(layer_values(r, i)[REAL_K]
                                                                        for i in moe_layer_ids([r])) for r in rows),
            "real_expert_flops_per_token": statistics.fmean(sum(layer_values(r, i)[REAL_FLOPS]
                                                                for i in moe_layer_ids([r])) for r in rows)}


def _variant_vs_moe(curves: dict[str, Curve], flops: dict, name: str) -> dict:
    """A --moe_variant run against (b), over the training FLOPs each spent: the eval losses at the smaller of the two
    runs' final FLOPs, and where the variant first reaches (b)'s final eval loss as a share of (b)'s FLOPs."""
    over_flops = {run: [(flops[run](s), loss) for s, loss in curves[run]] for run in (name, MOE)}
    result = {"training_flops_share": None, "reached_moe_final_loss": None}
    if not over_flops[name] or not over_flops[MOE]:
        return result
    moe_flops, moe_final = over_flops[MOE][-1]
    result["training_flops_share"] = over_flops[name][-1][0] / moe_flops
    compared = equal_added_flops(over_flops[name], over_flops[MOE])
    if compared:
        x, variant, moe = compared
        result.update(equal_flops=x, variant_eval_loss=variant, moe_eval_loss=moe, variant_minus_moe=variant - moe)
    crossing = first_reaching(over_flops[name], moe_final)
    result["reached_moe_final_loss"] = {
        "target_eval_loss": moe_final,
        "fraction_of_moe_flops": None if crossing.x is None else crossing.x / moe_flops,
        "how": ("not reached" if crossing.x is None else "at or before its first eval" if crossing.at_first_eval
                else "interpolated linearly between the two evals around the crossing")}
    return result


def _entropy_floor(run_dir: Path) -> dict | None:
    """The built-in corpus's entropy floor, overall and per domain, when the run trained on it (None otherwise)."""
    record = RunFolder(run_dir).record()
    data, seed = record.settings.data, record.settings.train.seed
    if data.train_file or data.dataset_name or not record.recorded("data", "synthetic_examples"):
        return None
    floor = entropy_floor(data.synthetic_examples, seed, synthetic_domains(data.synthetic_domains))
    return {"nats_per_token": floor.nats_per_token, "by_domain": floor.by_domain}


def _specialisation(run: RunResult) -> dict | None:
    """Per MoE layer: the (domain x expert) route counts and I(domain; expert) of the last eval that has them, and
    the information at every eval."""
    rows = [r for r in run.eval_rows if any(k.endswith(f"/{MUTUAL_INFORMATION}") or k.endswith(f"/{DOMAIN_COUNTS}")
                                             for k in r)]
    if not rows:
        return None
    layers = {}
    for i in moe_layer_ids(rows):
        last = layer_values(rows[-1], i)
        layers[str(i)] = {
            "domain_expert_counts": last.get(DOMAIN_COUNTS),
            "mutual_information_bits": last.get(MUTUAL_INFORMATION),
            "mutual_information_normalised": last.get(MUTUAL_INFORMATION_NORMALISED),
            "mutual_information_by_step": [[r["step"], layer_values(r, i)[MUTUAL_INFORMATION]] for r in rows
                                           if MUTUAL_INFORMATION in layer_values(r, i)],
        }
    return {"domains": run.domains, "step": rows[-1]["step"], "layers": layers}


def _reached(curves: dict[str, Curve], flops: dict, dense_steps: int) -> dict:
    """When each MoE first reaches the dense run's final eval loss, as a share of the dense run's steps and FLOPs."""
    dense = curves[DENSE]
    if not dense:
        return {}
    target = dense[-1][1]
    found = {"target_eval_loss": target, "dense_steps": dense_steps}
    for name in (MOE, UPCYCLED):
        crossing = first_reaching(curves[name], target)
        step = crossing.x
        found[name] = {
            "step": step,
            "fraction_of_dense_steps": None if step is None else step / dense_steps,
            "fraction_of_dense_flops": None if step is None else flops[name](step) / flops[DENSE](dense_steps),
            "how": ("not reached" if step is None else "at or before its first eval" if crossing.at_first_eval
                    else "interpolated linearly between the two evals around the crossing"),
        }
    return found


def _upcycled_vs_continued(curves: dict[str, Curve], flops: dict, n: int, continued_name: str) -> dict:
    """The upcycled run against a dense continuation (``continued_name``), both from step N on, over the FLOPs each
    added since N."""
    def added(name: str) -> Curve:
        return [(flops[name](s) - flops[name](n), loss) for s, loss in curves[name] if s >= n]

    upcycled, continued = added(UPCYCLED), added(continued_name)
    start = {name: next((loss for s, loss in curves[name] if s == n), None) for name in (UPCYCLED, DENSE)}
    compared = equal_added_flops(upcycled, continued)
    result = {"switch_step": n, "continuation": continued_name, "start_eval_loss": start}
    if compared:
        x, up, dense = compared
        result.update(added_flops=x, upcycled_eval_loss=up, dense_eval_loss=dense, upcycled_minus_dense=up - dense)
    return result
