"""Plots and a summary of a run from its metrics.jsonl: the `moe-report` command (``python -m moe_models.report``;
the library: metrics/run_report.py).

    moe-report OUTPUT_DIR [--report_dir DIR]
"""

from __future__ import annotations

from pathlib import Path

from .metrics.run_report import write_report
from .run.cli import ShortErrorParser


def main(argv: list[str] | None = None) -> None:
    parser = ShortErrorParser(description="Plots and a summary of a run from its metrics.jsonl.")
    parser.add_argument("output_dir", type=Path, help="the run's --output_dir (holds metrics.jsonl)")
    parser.add_argument("--report_dir", type=Path, help="where to write (default OUTPUT_DIR/report)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.output_dir, args.report_dir)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(paths[-1].read_text(), end="")
    print("Wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
