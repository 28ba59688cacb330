"""Does the MoE pay off? Dense vs MoE vs upcycled at equal active FLOPs, on the same batches: the library of the
`moe-payoff` command (moe_models/payoff.py). runs.py says which runs and why, runner.py runs them, analysis.py and
results.py turn their metrics into payoff.json, payoff_report.py writes payoff.md and the PNGs. docs/payoff.md."""
