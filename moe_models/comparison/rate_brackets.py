"""Is a model's best learning rate bracketed by the sweep? A best rate at either end of --sweep_lrs may not be the
model's best at all: a rate beyond the end could be better still. The next rate to try continues the sweep's own
step past that end: best x (largest / next largest) above it, best / (next smallest / smallest) below it; with one
rate, half and twice it."""

from __future__ import annotations

LARGEST, SMALLEST, ONLY = "largest", "smallest", "only"


def bracket(learning_rates: list[float | None], best: float | None) -> dict:
    """Where ``best`` sits in ``learning_rates``: ``edge`` None when a smaller and a larger rate were both swept
    (bracketed), else LARGEST, SMALLEST or ONLY (one rate), with the rates to try next."""
    lrs = sorted(lr for lr in learning_rates if lr is not None)
    if best is None:  # a cell of the command's rate, not recorded
        return {"best": None, "edge": ONLY, "next_to_try": []}
    if len(lrs) == 1:
        return {"best": best, "edge": ONLY, "next_to_try": [best / 2, best * 2]}
    if best == lrs[-1]:
        return {"best": best, "edge": LARGEST, "next_to_try": [best * lrs[-1] / lrs[-2]]}
    if best == lrs[0]:
        return {"best": best, "edge": SMALLEST, "next_to_try": [best / (lrs[1] / lrs[0])]}
    return {"best": best, "edge": None, "next_to_try": []}


def unbracketed_text(name: str, b: dict) -> str:
    """What the report says of a model whose best rate is not bracketed ("" when it is)."""
    tries = " and ".join(f"{lr:g}" for lr in b["next_to_try"])
    if b["edge"] is None:
        return ""
    if b["edge"] == ONLY and b["best"] is None:
        return f"{name} trained at one learning rate: not swept (--sweep_lrs)"
    if b["edge"] == ONLY:
        return f"{name} trained at one learning rate, {b['best']:g}: not swept (try {tries} with --sweep_lrs)"
    return f"{name}'s best rate {b['best']:g} is the {b['edge']} of the sweep (try {tries} next)"
