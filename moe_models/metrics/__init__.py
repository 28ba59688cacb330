"""What a run reports: sinks (metrics.jsonl, console, wandb), interval statistics over ranks, routing formulas,
throughput and MFU, device statistics, and the report of plots. Imports nothing above the package root."""
