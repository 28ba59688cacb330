"""The `moe-payoff` command (``python -m moe_models.payoff``): the train.py flags of the MoE to test, plus --upcycle_at;
trains the runs, then reports (the library: comparison/).

    python -m moe_models.payoff --output_dir outputs/payoff --max_steps 600 --eval_steps 50 ...
    deepspeed --num_gpus 2 --module moe_models.payoff --ep_size 2 ...     # every run on the launcher's ranks

Rerunning the same command after an interruption keeps the finished runs and resumes the others.
"""

from __future__ import annotations

import argparse
import sys

from .comparison.payoff_report import write_report
from .comparison.results import collect, write_json
from .comparison.runner import RunFailed, run_all
from .comparison.runs import DENSE_CONFIG, PAYOFF_DEFAULTS, check_same_command, plan_payoff, write_dense_config
from .run.cli import ShortErrorParser, parse_args
from .run.config import ConfigError
from .run.distributed import launched_rank
from .run.writes import WriteError, guarded_write


def payoff_parser() -> argparse.ArgumentParser:
    parser = ShortErrorParser(
        description="Train the dense model of equal active FLOPs, the MoE from scratch and the dense model upcycled "
        "part way, on the same batches, and report whether the MoE pays off (docs/payoff.md). Every other flag is a "
        "train.py flag (docs/configuration.md) and describes the MoE.", allow_abbrev=False)
    parser.add_argument("--upcycle_at", type=float, default=0.5,
                        help="Share of the steps the upcycled run trains as the dense model before it is upcycled "
                        "(rounded down to an eval step; default 0.5).")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    args, train_argv = payoff_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    command = [*PAYOFF_DEFAULTS, *train_argv]
    cfg = parse_args(command)  # unknown flags: usage and exit
    is_main = launched_rank() == 0
    try:
        plan = plan_payoff(cfg, command, args.upcycle_at)
        check_same_command(cfg, args.upcycle_at)
        write_dense_config(cfg, plan.output_dir / DENSE_CONFIG)
        run_all(plan, command, is_main)
    except (ConfigError, WriteError) as err:
        if is_main:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except RunFailed as err:
        if is_main:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(err.code)
    if not is_main:
        return None
    results = collect(plan, [f"--upcycle_at={args.upcycle_at}", *train_argv])
    try:
        with guarded_write("the payoff report", plan.output_dir):
            write_json(results, plan.output_dir / "payoff.json")
            report = write_report(results, plan.output_dir)
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"\n{report.read_text()}\nWrote {report}, {plan.output_dir / 'payoff.json'} and the PNGs beside them")
    return results


def command() -> None:
    """The `moe-payoff` console script: `main` without its return value (which the script would take for an exit
    status)."""
    main()


if __name__ == "__main__":
    command()
