"""payoff.md and its PNGs, from the numbers of payoff.json (results.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ..metrics.domain_heatmap import draw_domain_experts  # noqa: E402
from ..metrics.run_report import save  # noqa: E402
from .runs import DENSE, DENSE_CONTINUED, MOE, UPCYCLED  # noqa: E402

NOT_MEASURED = "not measured"


def write_report(results: dict, folder: Path, before: list[str] = ()) -> Path:
    """payoff.md and the PNGs it shows, in ``folder``, after the lines ``before``; returns the path of payoff.md."""
    images = plot_all(results, folder)
    path = folder / "payoff.md"
    path.write_text("\n".join([*before, *markdown(results, images)]) + "\n")
    return path


def markdown(r: dict, images: list[str]) -> list[str]:
    runs, n = r["runs"], r["switch_step"]
    lines = ["# Does the MoE pay off?", "",
             f"`python -m moe_models.payoff {shlex.join(r['command'])}`", "",
             (f"Learning rate {r['learning_rate']:g}, seed {r['seed']}. " if r.get("learning_rate") else "")
             + f"Every run read the same batches in the same order with the same seed and LR schedule ({r['max_steps']} "
             f"steps of {r['tokens_per_step']:,} tokens); (a) and (b) have the same active FLOPs per token up to the "
             f"router, and (c) is (b)'s MoE. {r['dense_continuation']}. Evals every {r['eval_steps']} steps; between "
             "evals a loss is interpolated linearly. Planned FLOPs/token: 6 x active parameters (top_k experts per "
             "MoE layer) + attention (metrics/throughput.py). Training FLOPs, and every FLOP axis below, are the "
             "realised ones: each logging interval's flops_per_token_spent from the run's metrics.jsonl, the "
             "experts its tokens actually ran (routes to null experts, past top-p's cut or dropped by capacity cost "
             "nothing; the planned figure where a run logged none, as the dense runs). Losses are deterministic for "
             "the seed; tokens/s and step time depend on the machine and on what else ran on it.", "",
             "| run | planned FLOPs/token | realised FLOPs/token | real experts/token | realised expert FLOPs/token | "
             "final eval loss | training FLOPs (realised) | tokens/s | step time (s) | energy (J/token) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        lines.append(f"| {name}: {run['label']} | {run['flops_per_token']:.4g} | "
                     f"{_num(run.get('flops_per_token_spent'), '.4g')} | {_dash(run.get('real_experts_per_token'))} | "
                     f"{_dash(run.get('real_expert_flops_per_token'), '.4g')} | {_num(run['final_eval_loss'])} | "
                     f"{_num(run['training_flops'], '.4g')} | {_num(run['tokens_per_sec'], '.0f')} | "
                     f"{_num(run['step_time'], '.3f')} | {_num(run['joules_per_token'], '.3g')} |")
    if all(run["joules_per_token"] is None for run in runs.values()):
        lines += ["", f"Energy: {NOT_MEASURED} (NVML's energy counter is read on NVIDIA GPUs only)."]
    lines += _reached_section(r.get("reached_dense_final_loss") or {})
    lines += _upcycled_section(r["upcycled_vs_dense_continuation"], r["upcycled_vs_dense_without_reset"], n)
    lines += _variants_section(r.get("variants_vs_moe") or {}, runs)
    lines += _domain_loss_section(runs, r.get("entropy_floor"))
    lines += _specialisation_section(runs)
    lines += ["", "## Plots", ""] + [f"![{image}]({image})" for image in images]
    return lines


def _reached_section(reached: dict) -> list[str]:
    if not reached:
        return []
    lines = ["", "## When does each MoE reach the dense run's final eval loss?", "",
             f"Target: {DENSE}'s final eval loss, {reached['target_eval_loss']:.4f} after {reached['dense_steps']} "
             "steps. The schedule biases this figure against the MoE: the dense run reaches its final loss at the "
             "decayed end of its learning-rate schedule, the MoE is read mid-schedule, at a rate not yet decayed. The "
             "gap over training (eval losses at equal steps, in the summary) is the comparison it does not bias.", "",
             "| run | reaches it at step | share of the dense run's steps | share of its FLOPs | how |",
             "|---|---|---|---|---|"]
    for name in (MOE, UPCYCLED):
        found = reached[name]
        lines.append(f"| {name} | {_step(found['step'])} | {_percent(found['fraction_of_dense_steps'])} | "
                     f"{_percent(found['fraction_of_dense_flops'])} | {found['how']} |")
    return lines


def _upcycled_section(fair: dict, without_reset: dict, n: int) -> list[str]:
    start = fair["start_eval_loss"]
    lines = ["", "## Upcycled against dense continuation", ""]
    if start[UPCYCLED] is not None and start[DENSE] is not None:
        lines.append(f"At the switch, step {n}: eval loss {start[UPCYCLED]:.6f} upcycled, {start[DENSE]:.6f} dense "
                     f"(difference {start[UPCYCLED] - start[DENSE]:+.2e}; granular upcycling starts as the dense "
                     "model when no token is dropped).")
    rows = [(f"({DENSE_CONTINUED[0]}) fresh optimizer state, as (c): the control", fair),
            ("(a) itself, which keeps its optimizer state (not the control: it differs from (c) in the optimizer "
             "state too)", without_reset)]
    shown = [(label, c) for label, c in rows if "added_flops" in c]
    if shown:
        lines += ["", f"At equal FLOPs added since step {n}:", "",
                  "| dense continuation | added FLOPs | upcycled eval loss | dense eval loss | upcycled - dense |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label} | {c['added_flops']:.4g} | {c['upcycled_eval_loss']:.4f} | {c['dense_eval_loss']:.4f} | "
                  f"{c['upcycled_minus_dense']:+.4f} |" for label, c in shown]
    if "added_flops" in fair:
        verdict = "beats" if fair["upcycled_minus_dense"] < 0 else "does not beat"
        lines += ["", f"The upcycled model {verdict} the fair dense continuation in this run."]
    return lines


def _variants_section(variants: dict, runs: dict) -> list[str]:
    """Each --moe_variant run against (b) at equal realised training FLOPs."""
    if not variants:
        return []
    lines = ["", f"## MoE variants against {MOE} at equal realised FLOPs", "",
             f"Each variant is {MOE} with the settings in its label; FLOPs are the training FLOPs each run spent. "
             f"Compared at the smaller of the two runs' final FLOPs (where neither is read past its last eval).", "",
             f"| run | expert FLOPs/token vs {MOE} | training FLOPs vs {MOE} | at equal FLOPs | variant eval loss | "
             f"{MOE} eval loss | variant - {MOE} | reaches {MOE}'s final loss at (share of its FLOPs) |",
             "|---|---|---|---|---|---|---|---|"]
    moe_expert = runs[MOE].get("real_expert_flops_per_token")
    for name, v in variants.items():
        expert = runs[name].get("real_expert_flops_per_token")
        reached = v.get("reached_moe_final_loss") or {}
        expert_share = expert / moe_expert if expert and moe_expert else None
        lines.append(f"| {name}: {runs[name]['label']} | {_percent(expert_share)} | "
                     f"{_percent(v['training_flops_share'])} | {_dash(v.get('equal_flops'), '.4g')} | "
                     f"{_dash(v.get('variant_eval_loss'))} | {_dash(v.get('moe_eval_loss'))} | "
                     f"{_dash(v.get('variant_minus_moe'), '+.4f')} | {_percent(reached.get('fraction_of_moe_flops'))}"
                     f"{'' if not reached else ' (' + reached['how'] + ')'} |")
    return lines


def _dash(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _domain_loss_section(runs: dict, floor: dict | None) -> list[str]:
    """Each run's final eval loss per domain, beside the corpus's entropy floor when it is known."""
    domains = list(next((run["final_eval_loss_by_domain"] for run in runs.values()
                         if run["final_eval_loss_by_domain"]), {}))
    if not domains:
        return []
    lines = ["", "## Final eval loss per domain", ""]
    if floor:
        lines += [f"The built-in corpus's entropy floor (the loss of a perfect model, `data.synthetic.entropy_floor`): "
                  f"{floor['nats_per_token']:.4f} nats/token overall.", ""]
    lines += ["| domain | " + " | ".join(runs) + (" | entropy floor |" if floor else " |"),
              "|---|" + "---|" * (len(runs) + bool(floor))]
    for domain in domains:
        cells = [_num(run["final_eval_loss_by_domain"].get(domain)) for run in runs.values()]
        if floor:
            cells.append(_num(floor["by_domain"].get(domain)))
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return lines


def _specialisation_section(runs: dict) -> list[str]:
    rows = [(name, layer, values) for name, run in runs.items() if run["specialisation"]
            for layer, values in run["specialisation"]["layers"].items()]
    if not rows:
        return ["", "## Specialisation", "", "No domain x expert counts in the eval rows (the data has no domains, or "
                                            "this version does not count them)."]
    lines = ["", "## Specialisation: I(domain; expert) at the last eval", "",
             "| run | MoE layer | I(domain; expert) (bits) | I / H(domain) |", "|---|---|---|---|"]
    lines += [f"| {name} | {layer} | {_num(values['mutual_information_bits'])} | "
              f"{_num(values['mutual_information_normalised'], '.3f')} |" for name, layer, values in rows]
    return lines


def _num(value, spec: str = ".4f") -> str:
    return NOT_MEASURED if value is None else format(value, spec)


def _step(value) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def plot_all(r: dict, folder: Path) -> list[str]:
    """The PNGs (names relative to ``folder``)."""
    names = ["eval_loss_vs_steps.png", "eval_loss_vs_flops.png", "speed.png"]
    _plot_curves(r, "step", folder / names[0])
    _plot_curves(r, "training_flops", folder / names[1])
    _plot_speed(r["runs"], folder / names[2])
    for name, run in r["runs"].items():
        special = run["specialisation"]
        for layer, values in (special or {}).get("layers", {}).items():
            if values["domain_expert_counts"]:
                image = f"domains_{name}_layer_{layer}.png"
                _plot_domains(values, special["domains"], f"{name}, MoE layer {layer}", folder / image)
                names.append(image)
    return names


def _plot_curves(r: dict, x_key: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in r["runs"].items():
        ax.plot([e[x_key] for e in run["eval"]], [e["eval_loss"] for e in run["eval"]], "o-", markersize=3,
                label=run["label"])
    switch = next((e[x_key] for e in r["runs"][DENSE]["eval"] if e["step"] == r["switch_step"]), None)
    if switch is not None:
        ax.axvline(switch, color="grey", linestyle=":", label="upcycling")
    ax.set(xlabel="step" if x_key == "step" else "training FLOPs", ylabel="eval loss (nats/token)",
           title="Eval loss")
    ax.legend()
    save(fig, path)


def _plot_speed(runs: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(runs)
    for ax, key, title in zip(axes, ("tokens_per_sec", "step_time"), ("tokens/s (median)", "step time, s (median)")):
        ax.bar(names, [runs[n][key] or 0 for n in names])
        ax.set_title(title)
    save(fig, path)


def _plot_domains(values: dict, domains: list[str] | None, title: str, path: Path) -> None:
    """One layer's domain x expert heatmap, drawn as the run's own report draws it (metrics/domain_heatmap.py)."""
    counts = values["domain_expert_counts"]
    fig, ax = plt.subplots(figsize=(2.5 + min(0.5 * len(counts[0]), 16), 1.5 + min(0.4 * len(counts), 16)))
    draw_domain_experts(ax, counts, domains, f"{title}: I = {_num(values['mutual_information_bits'], '.3f')} bits")
    save(fig, path)
