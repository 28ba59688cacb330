"""The top of payoff.md: the horizon (tokens per parameter), the learning-rate sweep (a table and lr_sweep.png, each
model's best rate and whether the sweep brackets it), the comparisons best against best with mean, spread over seeds,
verdict and its caveats, and the gap over training (a table and gap_over_training.png) (sweep.py's numbers)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ..metrics.run_report import save  # noqa: E402
from .horizon import horizon_text  # noqa: E402
from .rate_brackets import ONLY, unbracketed_text  # noqa: E402

SWEEP_PLOT, QUALITY_LATENCY_PLOT, GAP_PLOT = "lr_sweep.png", "quality_vs_decode_latency.png", "gap_over_training.png"


def summary_lines(summary: dict, cell_reports: dict[str, str] | None = None) -> list[str]:
    """Markdown for ``summary`` (sweep.summarise); ``cell_reports``: each cell's name and its payoff.md, linked."""
    lrs, seeds, final = summary["learning_rates"], summary["seeds"], summary["final_eval_loss"]
    lines = ["# Does the MoE pay off? Best against best", "",
             f"Learning rates {', '.join(f'{lr:g}' for lr in lrs)}; seeds {', '.join(map(str, seeds))} (a seed sets "
             "the model's initialisation, the data order and, on the built-in corpus, the corpus). Each model's best "
             "learning rate is the one of lowest mean final eval loss over the seeds; every comparison below pairs "
             "the runs of the same seed, each model at its best rate. Mean over the seeds, spread min..max "
             "(and the sample standard deviation). A goal is met only when every seed meets it: when the spread "
             "does not cover the threshold.", ""]
    lines += _horizon_lines(summary.get("horizon"))
    lines += ["## Final eval loss per learning rate (mean, min..max over seeds)", "",
              "| run | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
              "|---|" + "---|" * (len(lrs) + 1)]
    for name, by_lr in final.items():
        cells = [_spread(by_lr[repr(lr)]) for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary['best_learning_rate'][name]:g} |")
    lines += ["", _brackets_line(summary["rate_brackets"])]
    lines += ["", "## Comparisons, each model at its best learning rate", "",
              "| figure | by seed | mean | min..max | std | goal | verdict |", "|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        s = c["spread"]
        by_seed = ", ".join("not reached" if v is None else f"{v:.4f}" for v in c["by_seed"])
        verdict = "; ".join([c["verdict"], *c.get("caveats", [])]) if c["verdict"] else "-"
        lines.append(f"| {c['what']} | {by_seed} | {_f(s and s['mean'])} | "
                     f"{'-' if s is None else _f(s['min']) + '..' + _f(s['max'])} | {_f(s and s['std'])} | "
                     f"{c['goal'] or '-'} | {verdict} |")
    lines += ["", f"![{SWEEP_PLOT}]({SWEEP_PLOT})"]
    lines += _gap_lines(summary.get("gap_over_training") or [])
    lines += _inference_lines(summary.get("inference"))
    if cell_reports:
        lines += ["", "Each cell's own report: " + ", ".join(f"[{name}]({path})" for name, path in cell_reports.items())]
    return lines


def _brackets_line(brackets: dict) -> str:
    unbracketed = [unbracketed_text(name, b) for name, b in brackets.items() if b["edge"]]
    if not unbracketed:
        return "Each best rate is bracketed (a smaller and a larger rate were swept)."
    one = next(iter(brackets.values()))
    if one["edge"] == ONLY:
        tries = f" (try {' and '.join(f'{lr:g}' for lr in one['next_to_try'])})" if one["next_to_try"] else ""
        return f"One learning rate: not swept, so no model's best rate is bracketed{tries}; give --sweep_lrs."
    return "Not bracketed, so a better rate may lie beyond the sweep: " + "; ".join(unbracketed) + "."


def _horizon_lines(h: dict | None) -> list[str]:
    if not h:
        return []
    return ["## Horizon: tokens seen per parameter", "",
            ("**Too short to judge.** " if h["too_short"] else "") + horizon_text(h) + ". Every verdict below is "
            + ("marked so." if h["too_short"] else "made past the threshold."), ""]


def _gap_lines(gaps: list[dict]) -> list[str]:
    """Per gap, its mean and spread over the seeds at each eval, against the tokens seen."""
    lines = []
    for gap in gaps:
        if not gap["points"]:
            continue
        lines += ["", f"## Gap over training: {gap['what']}", "",
                  f"Below 0: the first run ahead. At equal steps both runs have seen the same tokens at the same point "
                  f"of the learning-rate schedule, so the schedule favours neither. Seeds "
                  f"{', '.join(map(str, gap['seeds']))}.", "",
                  "| step | tokens | by seed | mean | min..max | std |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['step']} | {p['tokens']:,} | {', '.join(f'{v:+.4f}' for v in p['by_seed'])} | "
                  f"{p['mean']:+.4f} | {p['min']:+.4f}..{p['max']:+.4f} | {_f(p['std'])} |" for p in gap["points"]]
    return lines + (["", f"![{GAP_PLOT}]({GAP_PLOT})"] if lines else [])


def plot_gap(summary: dict, path: Path) -> None:
    """Each gap over training against the tokens seen: the mean over seeds, shaded from min to max; 0 marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for gap in summary["gap_over_training"]:
        tokens = [p["tokens"] for p in gap["points"]]
        line, = ax.plot(tokens, [p["mean"] for p in gap["points"]], "o-", markersize=3, label=gap["what"])
        ax.fill_between(tokens, [p["min"] for p in gap["points"]], [p["max"] for p in gap["points"]],
                        color=line.get_color(), alpha=0.2)
    ax.axhline(0, color="grey", linestyle=":")
    ax.set(xlabel="tokens seen", ylabel="eval loss difference (nats/token)",
           title=f"Gap over training ({len(summary['seeds'])} seed(s): mean, min..max)")
    ax.legend(fontsize="small")
    save(fig, path)


def _inference_lines(inference: dict | None) -> list[str]:
    if not inference:
        return []
    figures, ratios = inference["models"], inference["ratios"]
    first = next(iter(figures.values()))
    batches = list(first["by_batch"])
    lines = ["", "## Inference: the exported models served by stock transformers", "",
             f"Measured in the models of {inference['cell']} (speed and memory do not depend on the learning rate or "
             f"seed) on {first['device']} in {first['dtype']}: prompts of {first['prompt_tokens']} random tokens, "
             f"{first['new_tokens']} new tokens, greedy generate calls; prefill tokens/s from a call of one new "
             "token, decode tokens/s from the rest; the fastest experts implementation per phase (tried: "
             f"{', '.join(next((f['experts_implementations_tried'] for f in figures.values() if f['experts_implementations_tried']), []) or ['none'])}). "
             "Ratios are to the dense model of equal active FLOPs; quality is the mean final eval loss at each "
             "model's best learning rate (below 1: better).", "",
             "| model | quality (loss ratio) | parameter bytes | " + " | ".join(
                 f"prefill tok/s, batch {b} | decode tok/s, batch {b} | KV bytes/token" for b in batches) + " |",
             "|---|---|---|" + "---|---|---|" * len(batches)]
    for name, f in figures.items():
        r = ratios[name]
        cells = [f"{f['by_batch'][b]['prefill_tokens_per_sec']:.0f} ({f['by_batch'][b]['prefill_experts_implementation'] or '-'}, "
                 f"x{r['by_batch'][b]['prefill_tokens_per_sec']:.2f}) | "
                 f"{f['by_batch'][b]['decode_tokens_per_sec']:.0f} ({f['by_batch'][b]['decode_experts_implementation'] or '-'}, "
                 f"x{r['by_batch'][b]['decode_tokens_per_sec']:.2f}) | "
                 f"{f['by_batch'][b]['kv_cache_bytes_per_token']:.0f} (x{r['by_batch'][b]['kv_cache_bytes_per_token']:.2f})"
                 for b in batches]
        lines.append(f"| {name} | x{r['final_eval_loss']:.4f} | {f['parameter_bytes']:,} (x{r['parameter_bytes']:.2f}) | "
                     + " | ".join(cells) + " |")
    energy = [f["by_batch"][b]["joules_per_generated_token"] for f in figures.values() for b in batches]
    lines += ["", "Energy per generated token: " + (
        ", ".join(f"{name} {f['by_batch'][b]['joules_per_generated_token']:.3g} J (batch {b})"
                  for name, f in figures.items() for b in batches)
        if all(e is not None for e in energy) else "not measured (NVML's energy counter is read on NVIDIA GPUs only).")]
    return lines + ["", f"![{QUALITY_LATENCY_PLOT}]({QUALITY_LATENCY_PLOT})"]


def plot_quality_latency(summary: dict, path: Path) -> None:
    """Mean final eval loss (min..max over seeds) at each model's best rate against its decode latency at batch 1."""
    inference = summary["inference"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, f in inference["models"].items():
        batch = next(iter(f["by_batch"]))
        loss = summary["final_eval_loss"][name][repr(summary["best_learning_rate"][name])]
        latency = 1000 * f["by_batch"][batch]["decode_seconds_per_token"]
        ax.errorbar([latency], [loss["mean"]], yerr=[[loss["mean"] - loss["min"]], [loss["max"] - loss["mean"]]],
                    marker="o", capsize=3, label=name)
    ax.set(xlabel=f"decode latency, ms per token (batch {batch})", ylabel="final eval loss (nats/token)",
           title="Quality against decode latency")
    ax.legend()
    save(fig, path)


def plot_sweep(summary: dict, path: Path) -> None:
    """Final eval loss against the learning rate per run: the mean over seeds, bars from min to max."""
    fig, ax = plt.subplots(figsize=(6, 4))
    lrs = summary["learning_rates"]
    for name, by_lr in summary["final_eval_loss"].items():
        values = [by_lr[repr(lr)] for lr in lrs]
        means = [v["mean"] for v in values]
        ax.errorbar(lrs, means, yerr=[[m - v["min"] for m, v in zip(means, values)],
                                      [v["max"] - m for m, v in zip(means, values)]], marker="o", capsize=3,
                    label=name)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="final eval loss (nats/token)",
           title=f"Learning-rate sweep ({len(summary['seeds'])} seed(s): mean, min..max)")
    ax.legend()
    save(fig, path)


def _spread(s: dict) -> str:
    return f"{s['mean']:.4f}" if s["n"] == 1 else f"{s['mean']:.4f} ({s['min']:.4f}..{s['max']:.4f})"


def _f(value) -> str:
    return "-" if value is None else f"{value:.4f}"
