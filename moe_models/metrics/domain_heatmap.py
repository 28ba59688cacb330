"""Domain x expert heatmaps of an eval row's routes per (domain, expert): which experts each domain's tokens go to.
The report draws one per MoE layer; wandb and TensorBoard get all layers as panels of one image at each eval."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .rows import layer_values, moe_layer_ids

COUNTS = "domain_expert_counts"


def layers_with_domain_counts(eval_row: dict) -> list[int]:
    """The MoE layers whose routes per (domain, expert) the row holds."""
    return [i for i in moe_layer_ids([eval_row]) if COUNTS in layer_values(eval_row, i)]


def draw_domain_experts(ax: Axes, counts_NE: Sequence[Sequence[int]], domains: Optional[Sequence[str]],
                        title: str) -> None:
    """One layer's heatmap on ``ax``: y the domain, x the expert; the colour is p(expert | domain) / p(expert), the
    domain's share of routes to the expert over the layer's share (1: white, as if the domain did not matter; red:
    the domain prefers the expert; blue: avoids it); each cell is labelled with p(expert | domain) in %."""
    counts = np.asarray(counts_NE, dtype=float)
    shown = counts.sum(axis=1) > 0  # domains with routes
    counts, names = counts[shown], [name for name, kept in zip(domain_names(domains, len(shown)), shown) if kept]
    given_domain = counts / counts.sum(axis=1, keepdims=True)
    overall = counts.sum(axis=0) / max(counts.sum(), 1.0)
    lift = np.divide(given_domain, overall, out=np.ones_like(given_domain), where=overall > 0)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(lift.max(initial=0.0))))
    image = ax.imshow(lift, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="p(expert | domain) / p(expert)")
    if counts.shape[1] <= 32 and counts.shape[0] <= 40:  # cells large enough for two digits
        for (y, x), share in np.ndenumerate(given_domain):
            dark = abs(float(norm(lift[y, x])) - 0.5) > 0.3
            ax.text(x, y, f"{100 * share:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set(xlabel="expert", ylabel="domain", xticks=range(counts.shape[1]), yticks=range(len(names)),
           yticklabels=names, title=title)


def domain_names(domains: Optional[Sequence[str]], count: int) -> list[str]:
    """The run's domain names, or their ids when the names are not known."""
    return list(domains) if domains and len(domains) == count else [str(d) for d in range(count)]


def layer_title(eval_row: dict, layer: int) -> str:
    values = layer_values(eval_row, layer)
    information = values["domain_mutual_information"]
    title = f"MoE layer {layer}, step {eval_row['step']}: I(domain; expert) {information:.3f} bits"
    if "domain_mutual_information_normalised" in values:
        title += f" ({100 * values['domain_mutual_information_normalised']:.0f}% of H(domain))"
    return title


def domain_expert_figure(eval_row: dict, layer: int, domains: Optional[Sequence[str]] = None) -> Figure:
    """One MoE layer's heatmap as a figure (the report's domain_experts_layer_{i}.png)."""
    counts = layer_values(eval_row, layer)[COUNTS]
    fig = Figure(figsize=(2.5 + min(0.5 * len(counts[0]), 16), 1.5 + min(0.4 * len(counts), 16)), layout="constrained")
    draw_domain_experts(fig.add_subplot(), counts, domains, layer_title(eval_row, layer))
    return fig


def domain_experts_figure(eval_row: dict, domains: Optional[Sequence[str]] = None) -> Figure:
    """Every MoE layer's heatmap, one panel per layer stacked top to bottom (wandb's and TensorBoard's image)."""
    layers = layers_with_domain_counts(eval_row)
    counts = [layer_values(eval_row, i)[COUNTS] for i in layers]
    width = 2.5 + min(0.5 * max(len(c[0]) for c in counts), 16)
    heights = [1.5 + min(0.4 * len(c), 16) for c in counts]
    fig = Figure(figsize=(width, min(sum(heights), 60)), layout="constrained")
    for ax, i, layer_counts in zip(fig.subplots(len(layers), 1, squeeze=False)[:, 0], layers, counts):
        draw_domain_experts(ax, layer_counts, domains, layer_title(eval_row, i))
    return fig
