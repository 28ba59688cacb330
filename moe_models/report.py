"""``python -m moe_models.report``: the command that draws a run's plots and summary (metrics/report.py)."""

from .metrics.report import main

if __name__ == "__main__":
    main()
