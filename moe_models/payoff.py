"""The `moe-payoff` command (``python -m moe_models.payoff``): the train.py flags of the MoE to test, plus --upcycle_at,
--sweep_lrs, --seeds, --moe_variant and the inference measurement's; trains the runs, then reports (the library:
comparison/).

    python -m moe_models.payoff --output_dir outputs/payoff --max_steps 600 --eval_steps 50 ...
    python -m moe_models.payoff --sweep_lrs 1e-3,2e-3 --seeds 3 ...     # each model at its best LR, 3 seeds
    python -m moe_models.payoff --moe_variant top_p=0.5,top_k=4 ...     # (b) with top-p, at equal realised FLOPs
    deepspeed --num_gpus 2 --module moe_models.payoff --ep_size 2 ...     # every run on the launcher's ranks

Rerunning the same command after an interruption keeps the finished runs and resumes the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .comparison.horizon import horizon, horizon_text, model_parameters
from .comparison.inference import export_dense, measure, ratios
from .comparison.payoff_report import write_report
from .comparison.results import collect, write_json
from .comparison.runner import RunFailed, run_all
from .comparison.runs import (DENSE, DENSE_CONFIG, MOE, PAYOFF_DEFAULTS, UPCYCLED, PayoffGrid, check_same_command,
                              plan_grid, write_dense_config)
from .comparison.summary_report import (GAP_PLOT, QUALITY_LATENCY_PLOT, SWEEP_PLOT, plot_gap, plot_quality_latency,
                                        plot_sweep, summary_lines)
from .comparison.sweep import summarise
from .hf.exporter import export
from .run.cli import ShortErrorParser, parse_args
from .run.config import ConfigError
from .run.distributed import launched_rank, launched_world_size
from .run.writes import WriteError, guarded_write


def payoff_parser() -> argparse.ArgumentParser:
    parser = ShortErrorParser(
        description="Train the dense model of equal active FLOPs, the MoE from scratch, the dense model upcycled part "
        "way and its fair dense continuation, on the same batches (at each learning rate and seed), and report "
        "whether the MoE pays off, in training and in inference (docs/payoff.md). Every other flag is a train.py "
        "flag (docs/configuration.md) and describes the MoE.", allow_abbrev=False)
    parser.add_argument("--upcycle_at", type=float, default=0.5,
                        help="Share of the steps the upcycled run trains as the dense model before it is upcycled "
                        "(rounded down to an eval step; default 0.5).")
    parser.add_argument("--sweep_lrs", type=_learning_rates, metavar="LR,LR,...",
                        help="Train every run at each of these learning rates (full length each) and compare each "
                        "model at its best; replaces --learning_rate.")
    parser.add_argument("--seeds", type=int, default=1,
                        help="Train every comparison with this many seeds (--seed, --seed + 1, ...) and report the "
                        "mean and spread over them (default 1).")
    parser.add_argument("--inference_batch", type=int, default=8,
                        help="The larger batch of the inference measurement (beside batch 1) of the exported models; "
                        "0: no inference measurement (default 8).")
    parser.add_argument("--inference_new_tokens", type=int, default=32,
                        help="Tokens each generate call of the inference measurement adds (default 32).")
    parser.add_argument("--moe_variant", action="append", metavar="NAME=VALUE,...",
                        help="Add a run: the MoE from scratch (b) with these train.py settings, such as "
                        "top_p=0.5,top_k=4 or num_null_experts=4,router_bias_update_rate=1e-3,"
                        "null_expert_target_real_k=1.5; the report compares it with (b) at equal realised training "
                        "FLOPs. Repeat for more runs.")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser


def _learning_rates(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (1e-3,2e-3)") from None


def main(argv: list[str] | None = None) -> dict | None:
    args, train_argv = payoff_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    command = [*PAYOFF_DEFAULTS, *train_argv]
    cfg = parse_args(command)  # unknown flags: usage and exit
    is_main = launched_rank() == 0
    try:
        grid = plan_grid(cfg, command, args.upcycle_at, args.sweep_lrs, args.seeds, launched_world_size(),
                         args.moe_variant)
        check_same_command(cfg, args.upcycle_at, {"sweep_lrs": args.sweep_lrs, "seeds": args.seeds,
                                                  "moe_variants": args.moe_variant})
        write_dense_config(cfg, grid.output_dir / DENSE_CONFIG)
        reach = None
        if is_main:
            dense = parse_args([*command, "--model_config", str(grid.output_dir / DENSE_CONFIG),
                                "--moe_layers", "none"])  # (a)'s settings
            reach = horizon(model_parameters(cfg, dense), cfg.train.max_steps, grid.tokens_per_step)
            print(f"payoff: {grid.cost()}\npayoff: horizon: {horizon_text(reach)}", flush=True)
        run_all(grid, command, is_main)
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
    given = [f"--upcycle_at={args.upcycle_at}", *_grid_flags(args), *train_argv]
    try:
        with guarded_write("the payoff report", grid.output_dir):
            results, report = write_reports(grid, given, args.inference_batch, args.inference_new_tokens, reach)
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"\n{report.read_text()}\nWrote {report}, {grid.output_dir / 'payoff.json'} and the PNGs beside them")
    return results


def write_reports(grid: PayoffGrid, given: list[str], inference_batch: int, new_tokens: int,
                  reach: dict | None = None) -> tuple[dict, Path]:
    """payoff.json, payoff.md and the PNGs: each cell's in its folder, the summary in output_dir (one cell: all in
    output_dir, the summary on top); ``reach``: the horizon (comparison/horizon.py)."""
    cells = {cell.output_dir.name: collect(cell, given) for cell in grid.cells}
    summary = summarise(list(cells.values()), reach)
    if inference_batch:
        summary["inference"] = measure_inference(grid, summary, inference_batch, new_tokens)
        plot_quality_latency(summary, grid.output_dir / QUALITY_LATENCY_PLOT)
    plot_sweep(summary, grid.output_dir / SWEEP_PLOT)
    plot_gap(summary, grid.output_dir / GAP_PLOT)
    one = len(grid.cells) == 1
    for cell, results in zip(grid.cells, cells.values()):
        write_report(results, cell.output_dir, before=[*summary_lines(summary), ""] if one else [])
        write_json(results if not one else {**results, "summary": summary}, cell.output_dir / "payoff.json")
    if not one:
        links = {name: f"{name}/payoff.md" for name in cells}
        (grid.output_dir / "payoff.md").write_text("\n".join(summary_lines(summary, links)) + "\n")
        write_json({"command": given, "summary": summary, "cells": cells}, grid.output_dir / "payoff.json")
    results = next(iter(cells.values())) if one else {"summary": summary, "cells": cells}
    return ({**results, "summary": summary} if one else results), grid.output_dir / "payoff.md"


def measure_inference(grid: PayoffGrid, summary: dict, batch: int, new_tokens: int) -> dict:
    """Export (a), (b) and (c) of the cell at the dense model's best rate and the first seed to output_dir/inference/
    and measure them (comparison/inference.py); (d) is (a)'s model."""
    cell = next(c for c in grid.cells if c.learning_rate in (None, summary["best_learning_rate"][DENSE]))
    figures = {}
    for name in (DENSE, MOE, UPCYCLED):
        folder = grid.output_dir / "inference" / name
        print(f"payoff: inference of {cell.run_dir(name)}", flush=True)
        if name == DENSE:
            export_dense(cell.run_dir(name), folder)
        else:
            export(cell.run_dir(name) / "checkpoints", folder, overwrite=True)
        figures[name] = measure(folder, batch_sizes=(1, batch), prompt_tokens=min(64, grid.block_size),
                                new_tokens=new_tokens)
    quality = {name: summary["final_eval_loss"][name][repr(summary["best_learning_rate"][name])]["mean"]
               for name in figures}
    return {"cell": cell.output_dir.name, "models": figures, "ratios": ratios(figures, DENSE, quality)}


def _grid_flags(args: argparse.Namespace) -> list[str]:
    return ([f"--sweep_lrs={','.join(map(repr, args.sweep_lrs))}"] if args.sweep_lrs else []) + \
        ([f"--seeds={args.seeds}"] if args.seeds != 1 else []) + \
        [f"--moe_variant={spec}" for spec in args.moe_variant or []]


def command() -> None:
    """The `moe-payoff` console script: `main` without its return value (which the script would take for an exit
    status)."""
    main()


if __name__ == "__main__":
    command()
