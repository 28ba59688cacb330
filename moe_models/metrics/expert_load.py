"""Every MoE layer's expert load at one eval: a table with one line per (layer, expert), and a layer x expert heatmap
of each expert's share of its layer's routes. Both are read from the latest training row (the routing counters of
its interval) and the eval row (expert_similarity); wandb and tensorboard log them at each eval.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .rows import layer_values, moe_layer_ids

# Lists of E in a training row, one value per expert; the table's name for each.
PER_EXPERT = {"routed_per_expert": "routes", "tokens_per_expert": "kept", "score_bias": "score_bias"}
FIRST_COLUMNS = ["layer", "expert", "routes", "share", "kept"]


def routing_table(train_row: dict, eval_row: dict | None = None) -> tuple[list[str], list[list]]:
    """(columns, rows): per (MoE layer, expert) its routes (the router's choices, before capacity), share (routes over
    the layer's routes), kept (routes processed, after capacity), score_bias when logged, then the layer's own
    values (drop_fraction, router_entropy, imbalance, ..., expert_similarity and domain_mutual_information from the
    eval row), repeated on each of its experts' lines."""
    layers = {i: {**layer_values(train_row, i), **layer_values(eval_row or {}, i)} for i in moe_layer_ids([train_row])}
    for values in layers.values():
        values.pop("domain_expert_counts", None)  # a domain x expert table, not an expert's value: moe/domain_experts
    columns = FIRST_COLUMNS + (["score_bias"] if any("score_bias" in values for values in layers.values()) else [])
    columns += sorted({key for values in layers.values() for key in values if key not in PER_EXPERT})
    rows = []
    for i, values in layers.items():
        routes = values["routed_per_expert"]
        total = sum(routes)
        for expert, routed in enumerate(routes):
            line = {"layer": i, "expert": expert, "share": routed / total if total else 0.0}
            line.update({PER_EXPERT[k]: values[k][expert] for k in PER_EXPERT if k in values})
            line.update({key: value for key, value in values.items() if key not in PER_EXPERT})
            rows.append([line.get(column) for column in columns])
    return columns, rows


def route_shares(train_row: dict) -> tuple[list[int], np.ndarray]:
    """(MoE layer ids, shares [layers, max E]): each expert's share of its layer's routes; NaN past a layer's E."""
    layers = moe_layer_ids([train_row])
    routes = [np.asarray(layer_values(train_row, i)["routed_per_expert"], dtype=float) for i in layers]
    shares = np.full((len(layers), max((len(r) for r in routes), default=0)), np.nan)
    for row, counts in zip(shares, routes):
        row[:len(counts)] = counts / max(counts.sum(), 1e-12)
    return layers, shares


def expert_load_figure(train_row: dict) -> Figure:
    """The heatmap: y the MoE layer, x the expert, colour the share over an even share (1/E: white; red above, blue
    below, as in the report's expert_load_layer_{i}.png), each cell labelled with its share in %."""
    layers, shares = route_shares(train_row)
    experts = np.sum(~np.isnan(shares), axis=1, keepdims=True)  # E of each layer
    relative = shares * experts
    # Half an inch per expert and 0.4 per layer, up to 16 inches each way (1600 pixels at matplotlib's 100 dpi).
    fig = Figure(figsize=(2.5 + min(0.5 * shares.shape[1], 16), 1.5 + min(0.4 * len(layers), 16)), layout="constrained")
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(np.nanmax(relative, initial=0.0))))
    image = ax.imshow(relative, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share / even share (1/E)")
    if shares.shape[1] <= 32 and len(layers) <= 40:  # cells large enough for two digits
        for (y, x), share in np.ndenumerate(shares):
            if not np.isnan(share):
                dark = abs(float(norm(relative[y, x])) - 0.5) > 0.3  # deep red or blue: white text
                ax.text(x, y, f"{100 * share:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set(xlabel="expert", ylabel="MoE layer", xticks=range(shares.shape[1]), yticks=range(len(layers)),
           yticklabels=layers, title=f"step {train_row['step']}: share of each layer's routes (%)")
    return fig


def figure_pixels(fig: Figure) -> np.ndarray:
    """The figure drawn by matplotlib's Agg renderer as RGB pixels [H, W, 3] (uint8), without pyplot."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
