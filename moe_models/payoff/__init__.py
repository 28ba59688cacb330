"""Does the MoE pay off? Dense vs MoE vs upcycled at equal active FLOPs, on the same batches: the `moe-payoff`
command (``python -m moe_models.payoff``). plan.py says which runs and why, runner.py runs them, results.py and
report.py write payoff.json, payoff.md and the PNGs. docs/payoff.md."""

from .command import command, main

__all__ = ["command", "main"]
