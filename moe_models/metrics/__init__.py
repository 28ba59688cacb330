"""What a run reports: sinks (metrics.jsonl, console, wandb, TensorBoard), routing formulas, collapse warnings,
throughput and MFU, device statistics, and the report of plots. Imports nothing above run/."""
