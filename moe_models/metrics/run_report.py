"""Plots and a text summary of a run from its metrics.jsonl, without wandb.

    moe-report OUTPUT_DIR     # writes OUTPUT_DIR/report/*.png and summary.txt (moe_models/report.py)

loss.png (train and eval loss), throughput.png (tokens/s, and MFU when logged), expert_load_layer_{i}.png
(router load per expert over time, one per MoE layer), routing.png (drop fraction, router entropy and
imbalance per layer), domain_experts_layer_{i}.png (the last eval's routes per (domain, expert), when the data has
domains). How to read them: docs/metrics.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from ..run.folder import RunFolder  # noqa: E402
from ..run.writes import guarded_write  # noqa: E402
from .domain_heatmap import domain_expert_figure, layers_with_domain_counts  # noqa: E402
from .rows import layer_values, moe_layer_ids  # noqa: E402


def read_rows(output_dir: Path) -> tuple[list[dict], list[dict]]:
    """A run's (training rows, eval rows), each sorted by step; a step logged twice (a resumed run) keeps its last
    row."""
    rows = RunFolder(output_dir).metrics.rows()
    train = {r["step"]: r for r in rows if "loss" in r}
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in kept], [r[key] for r in kept]


def load_relative_to_even(rows: list[dict], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(step edges [n+1], load [E, n]): each interval's router choices per expert over an even share (1.0)."""
    key = f"moe/layer_{layer}/routed_per_expert"
    kept = [r for r in rows if key in r]
    load = np.array([r[key] for r in kept], dtype=float)  # [intervals, E]
    even = load.sum(axis=1, keepdims=True) / load.shape[1]
    steps = [r["step"] for r in kept]
    edges = np.array([steps[0] - 1, *steps])  # column i covers the logging interval that ends at steps[i]
    return edges, (load / np.maximum(even, 1e-12)).T


def plot_loss(train: list[dict], evals: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series(train, "loss"), label="train loss (LM)")
    if evals:
        ax.plot(*series(evals, "eval_loss"), "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.legend()
    save(fig, path)


def plot_throughput(train: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series(train, "tokens_per_sec"), label="tokens/s (all devices)")
    ax.set(xlabel="step", ylabel="tokens/s", title="Throughput")
    if any("mfu" in r for r in train):
        steps, mfu = series(train, "mfu")
        twin = ax.twinx()
        twin.plot(steps, [100 * m for m in mfu], color="tab:orange", label="MFU")
        twin.set_ylabel("MFU (%)")
        twin.legend(loc="lower right")
    ax.legend(loc="upper left")
    save(fig, path)


def plot_expert_load(train: list[dict], layer: int, path: Path) -> None:
    edges, load = load_relative_to_even(train, layer)
    num_experts = load.shape[0]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.25 * num_experts))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(load.max())))
    mesh = ax.pcolormesh(edges, np.arange(num_experts + 1) - 0.5, load, cmap="RdBu_r", norm=norm)
    fig.colorbar(mesh, ax=ax, label="load / even share")
    ax.set(xlabel="step", ylabel="expert", title=f"MoE layer {layer}: router load per expert (before capacity)")
    save(fig, path)


def plot_routing(train: list[dict], layers: list[int], path: Path) -> None:
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    for layer in layers:
        for ax, key in zip(axes, ("drop_fraction", "router_entropy", "imbalance")):
            ax.plot(*series(train, f"moe/layer_{layer}/{key}"), label=f"layer {layer}")
    max_entropy = max_router_entropy(train, layers)
    axes[1].axhline(max_entropy, color="grey", linestyle="--", label=f"ln E = {max_entropy:.2f}")
    axes[0].set(ylabel="drop fraction", title="Routing health per MoE layer")
    axes[1].set(ylabel="router entropy (nats)")
    axes[2].set(ylabel="imbalance (max/mean)", xlabel="step")
    axes[1].legend(fontsize="small")
    save(fig, path)


def max_router_entropy(rows: list[dict], layers: list[int]) -> float:
    """ln E of the layer with the most experts: the entropy of a router that spreads every token evenly."""
    return max(math.log(len(rows[-1][f"moe/layer_{i}/routed_per_expert"])) for i in layers)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_text(train: list[dict], evals: list[dict], layers: list[int]) -> str:
    last = train[-1]
    lines = [f"{len(train)} logged intervals up to step {last['step']}, {last['tokens_seen']:,} tokens seen",
             f"loss {train[0]['loss']:.4f} -> {last['loss']:.4f}"]
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        lines.append(f"eval_loss {evals[-1]['eval_loss']:.4f} at step {evals[-1]['step']} "
                     f"(best {best['eval_loss']:.4f} at step {best['step']})")
    rates = [r["tokens_per_sec"] for r in train[1:]] or [last["tokens_per_sec"]]  # the first step includes warmup
    lines.append(f"tokens/s median {np.median(rates):,.0f} (first interval left out)")
    if "mfu" in last:
        lines.append(f"mfu median {100 * np.median([r['mfu'] for r in train if 'mfu' in r]):.1f}%")
    if "joules_per_token" in last:
        lines.append(f"energy {sum(r['energy_j'] for r in train):,.0f} J, last interval "
                     f"{last['joules_per_token']:.3g} J/token")
    similarity = {i: evals[-1].get(f"moe/layer_{i}/expert_similarity") for i in layers} if evals else {}
    memory = {key: max(r[key] for r in train) for key in ("gpu_max_allocated_gib", "cpu_rss_gib") if key in last}
    lines.append("peak memory (max over ranks): " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items()))
    for i in layers:
        layer = layer_values(last, i)
        load = layer["routed_per_expert"]
        even = sum(load) / len(load)
        starved = [e for e, n in enumerate(load) if n < 0.1 * even]
        text = (f"moe layer {i}: imbalance {layer['imbalance']:.2f}, dropped {100 * layer['drop_fraction']:.1f}%, "
                f"router entropy {layer['router_entropy']:.2f} of {math.log(len(load)):.2f} nats")
        if similarity.get(i) is not None:
            text += f", expert similarity {similarity[i]:.3f}"
        if starved:
            text += f"; experts under 10% of an even share: {starved}"
        lines.append(text)
    for i in layers_with_domain_counts(evals[-1]) if evals else []:
        values = layer_values(evals[-1], i)
        normalised = values.get("domain_mutual_information_normalised")
        lines.append(f"moe layer {i}: I(domain; expert) {values['domain_mutual_information']:.3f} bits"
                     + (f" ({100 * normalised:.0f}% of H(domain))" if normalised is not None else "")
                     + f" at step {evals[-1]['step']}")
    return "\n".join(lines) + "\n"


def run_domains(output_dir: Path) -> list[str] | None:
    """The run's domain names (its record's resolved domains), None when not recorded."""
    folder = RunFolder(output_dir)
    return folder.record().resolved.domains if folder.holds_run() else None


def write_report(output_dir: Path, report_dir: Path | None = None) -> list[Path]:
    """Write the PNGs and summary.txt into ``report_dir`` (default OUTPUT_DIR/report); returns their paths."""
    folder = RunFolder(output_dir)
    if not folder.metrics.exists():
        raise FileNotFoundError(f"{folder.metrics.path} not found: give the --output_dir of a train.py run")
    train, evals = read_rows(output_dir)
    if not train:
        raise ValueError(f"{folder.metrics.path} has no training rows yet (the first is written after step 1)")
    report_dir = report_dir or folder.report_dir
    with guarded_write("the report", report_dir):
        return _write_report(train, evals, report_dir, output_dir)


def _write_report(train: list[dict], evals: list[dict], report_dir: Path, output_dir: Path) -> list[Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    layers = moe_layer_ids(train)
    paths = [report_dir / "loss.png", report_dir / "throughput.png"]
    plot_loss(train, evals, paths[0])
    plot_throughput(train, paths[1])
    if layers:
        for layer in layers:
            paths.append(report_dir / f"expert_load_layer_{layer}.png")
            plot_expert_load(train, layer, paths[-1])
        paths.append(report_dir / "routing.png")
        plot_routing(train, layers, paths[-1])
    for layer in layers_with_domain_counts(evals[-1]) if evals else []:
        paths.append(report_dir / f"domain_experts_layer_{layer}.png")
        domain_expert_figure(evals[-1], layer, run_domains(output_dir)).savefig(paths[-1], dpi=100)
    paths.append(report_dir / "summary.txt")
    paths[-1].write_text(summary_text(train, evals, layers))
    return paths
