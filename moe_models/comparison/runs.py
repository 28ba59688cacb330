"""The runs of a payoff comparison: which train.py flags each gets, and the dense model of equal active FLOPs.

The flags given describe the MoE: its base config (--model_config, whose FFN width F is each expert's width), E
experts, top-k. The runs:

    a_dense      the dense model with FFN width k x F (the same active FLOPs per token), for all the steps
    b_moe        the MoE from scratch (--expert_init random)
    c_upcycled   (a) at the switch step N, upcycled with --expert_init granular --granularity k (E experts, each a
                 1/k slice of the dense FFN: the MoE of (b), starting as exactly the dense model) and trained to the
                 end on (a)'s schedule and batches (--upcycle_from_checkpoint)

The dense continuation, the control for (c), is (a) itself from step N on: (a) trains every step on the same
batches with the same schedule, so a separate run would repeat it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..models.source import resolve_model_config
from ..run.config import ConfigError, RunConfig
from ..run.folder import RunFolder
from ..run.moe_layout import NO_MOE_LAYERS, expert_counts
from ..run.writes import atomic_write

# A payoff's own defaults (the flags given still win): dropless, deterministic top-2, so that the upcycled model
# starts as exactly the dense one (docs/upcycling.md) and both MoEs route alike. train.py's defaults too, written out
# so that a payoff's runs do not change with them.
PAYOFF_DEFAULTS = ["--output_dir", "outputs/payoff", "--drop_tokens", "false", "--top2_2nd_expert_sampling", "false"]
# Settings the payoff sets per run; given on its command line they would be overridden, so they are refused.
SET_PER_RUN = ("resume_from_checkpoint", "upcycle_from_checkpoint", "expert_init", "granularity", "moe_layers",
               "model_name_or_path")
PLAN_FILE = "payoff_plan.json"
DENSE_CONFIG = "dense_model/config.json"


@dataclass(frozen=True)
class PayoffRun:
    name: str      # its folder under the payoff's output_dir
    label: str     # what the report calls it
    flags: list[str]  # appended to the command's own flags (argparse keeps the last value of a flag)


@dataclass(frozen=True)
class PayoffPlan:
    output_dir: Path
    max_steps: int
    switch_step: int
    top_k: int
    runs: list[PayoffRun]

    def run_dir(self, name: str) -> Path:
        return self.output_dir / name


DENSE, MOE, UPCYCLED = "a_dense", "b_moe", "c_upcycled"


def plan_payoff(cfg: RunConfig, train_argv: list[str], upcycle_at: float) -> PayoffPlan:
    """The runs of the comparison for the settings ``cfg`` (parsed from ``train_argv``); a ConfigError when the
    comparison cannot be made with them."""
    problems = payoff_problems(cfg, train_argv, upcycle_at)
    if problems:
        raise ConfigError(problems)
    t, k = cfg.train, cfg.moe.top_k
    out = Path(t.output_dir)
    switch = switch_step(t.max_steps, t.eval_steps, upcycle_at)
    dense_config = str(out / DENSE_CONFIG)
    dense_saves = math.gcd(t.save_steps, switch) if t.save_steps else switch  # (c) starts from the save at N
    own = ["--resume_from_checkpoint", "latest"]  # a rerun continues each run where it stopped
    runs = [
        PayoffRun(DENSE, f"(a) dense, FFN width {k} x F", [
            "--output_dir", str(out / DENSE), "--model_config", dense_config, "--moe_layers", NO_MOE_LAYERS,
            "--save_steps", str(dense_saves), "--save_total_limit", "0", *own]),
        PayoffRun(MOE, "(b) MoE from scratch", [
            "--output_dir", str(out / MOE), "--expert_init", "random", *own]),
        PayoffRun(UPCYCLED, f"(c) dense to step {switch}, then upcycled", [
            "--output_dir", str(out / UPCYCLED), "--model_config", dense_config, "--expert_init", "granular",
            "--granularity", str(k), "--upcycle_from_checkpoint",
            str(RunFolder(out / DENSE).checkpoints.tag_dir(switch)), *own]),
    ]
    return PayoffPlan(out, t.max_steps, switch, k, runs)


def switch_step(max_steps: int, eval_steps: int, upcycle_at: float) -> int:
    """N, where (c) leaves the dense run: upcycle_at x max_steps, rounded down to an eval step (so that the dense
    run has an eval there to compare the upcycled start with), and at least one eval interval."""
    wanted = int(upcycle_at * max_steps)
    return max(wanted - wanted % eval_steps, eval_steps) if eval_steps else max(wanted, 1)


def payoff_problems(cfg: RunConfig, train_argv: list[str], upcycle_at: float) -> list[str]:
    problems = []
    given = {arg.removeprefix("--").split("=", 1)[0] for arg in train_argv if arg.startswith("--")}
    problems += [f"--{name} is set by the payoff for each run (docs/payoff.md); leave it out" for name in SET_PER_RUN
                 if name in given]
    if cfg.train.plan:
        problems.append("--plan prints one run's preflight plan and trains nothing: run train.py --plan with the MoE's "
                        "flags (and with --moe_layers none for the dense run) instead")
    if not 0 < upcycle_at < 1:
        problems.append(f"upcycle_at ({upcycle_at}) must be between 0 and 1: the share of the steps the upcycled run "
                        "spends as the dense model")
    counts = expert_counts(cfg.moe)
    problems += [f"num_experts ({count}) must be a multiple of top_k ({cfg.moe.top_k}): the upcycled run cuts the dense "
                 f"FFN of width top_k x F into top_k slices, and each group of top_k experts holds them once"
                 for count in counts if count % cfg.moe.top_k]
    t = cfg.train
    if t.eval_steps and t.eval_steps >= t.max_steps:
        problems.append(f"eval_steps ({t.eval_steps}) must be below max_steps ({t.max_steps}): the report compares "
                        "eval losses along the way")
    elif switch_step(t.max_steps, t.eval_steps, upcycle_at) >= t.max_steps:
        problems.append(f"upcycle_at {upcycle_at} of {t.max_steps} steps leaves no step for the upcycled run")
    return problems


def write_dense_config(cfg: RunConfig, path: Path) -> None:
    """The dense model of (a) and (c): the MoE's base config with FFN width top_k x F. Written atomically (every rank
    of a launch writes the same file)."""
    config = resolve_model_config(cfg.model)
    key = "intermediate_size" if hasattr(config, "intermediate_size") else "n_inner"
    width = getattr(config, key, None) or 4 * config.hidden_size  # GPT-2's n_inner None means 4 x n_embd
    setattr(config, key, width * cfg.moe.top_k)
    _atomic_write(path, config.to_json_string())


def check_same_command(cfg: RunConfig, upcycle_at: float) -> None:
    """A payoff folder continues only the settings that started it (wherever the folder now is): the runs it kept
    were trained with those."""
    settings = {"upcycle_at": upcycle_at, **_flat_settings(cfg)}
    path = Path(cfg.train.output_dir) / PLAN_FILE
    if not path.is_file():
        _atomic_write(path, json.dumps(settings, indent=2) + "\n")
        return
    # a setting newer than the folder's record was, for its runs, at its default
    recorded = {**_flat_settings(RunConfig()), **json.loads(path.read_text())}
    differing = sorted(name for name in settings.keys() | recorded.keys() if settings.get(name) != recorded.get(name))
    if differing:
        shown = ", ".join(f"--{name} {recorded.get(name)!r} there, {settings.get(name)!r} here"
                          for name in differing[:4])
        raise ConfigError([f"{cfg.train.output_dir} holds a payoff with other settings ({shown}); rerun it with its "
                           f"own ({path}) to continue it, or choose another --output_dir"])


def _flat_settings(cfg: RunConfig) -> dict:
    return {name: value for section in cfg.to_dict().values() for name, value in section.items()
            if name != "output_dir"}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
