"""The runs of a payoff comparison: which train.py flags each gets, and the dense model of equal active FLOPs.

The flags given describe the MoE: its base config (--model_config, whose FFN width F is each expert's width), E
experts, top-k. The runs:

    a_dense      the dense model with FFN width k x F (the same active FLOPs per token), for all the steps
    b_moe        the MoE from scratch (--expert_init random)
    c_upcycled   (a) at the switch step N, upcycled with --expert_init granular --granularity k (E experts, each a
                 1/k slice of the dense FFN: the MoE of (b), starting as exactly the dense model) and trained to the
                 end on (a)'s schedule and batches (--upcycle_from_checkpoint)

    d_dense_continued  (a) at step N, continued as the dense model with (c)'s treatment: a fresh optimizer state
                 (--reset_optimizer), (a)'s schedule and batches from step N; the control for (c). (a) itself from
                 step N on is the continuation without the reset, shown beside it.
    e{i}_variant (--moe_variant, each): (b) with other train.py settings, such as adaptive compute (--top_p,
                 --num_null_experts), compared with (b) at equal realised training FLOPs

A payoff is a grid of such cells: one per learning rate (--sweep_lrs) and seed (--seeds); every run of a cell has
its learning rate and seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..models.source import resolve_model_config
from ..moe.checks import moe_problems
from ..run.cli import parse_args
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
               "model_name_or_path", "reset_optimizer")
OWN_CHECKPOINT = ["--resume_from_checkpoint", "latest"]  # a rerun continues each run where it stopped
PLAN_FILE = "payoff_plan.json"
GRID_DEFAULTS = {"sweep_lrs": None, "seeds": 1, "moe_variants": None}  # the payoff's own grid flags, at their defaults
DENSE_CONFIG = "dense_model/config.json"


@dataclass(frozen=True)
class PayoffRun:
    name: str      # its folder under the payoff's output_dir
    label: str     # what the report calls it
    flags: list[str]  # appended to the command's own flags (argparse keeps the last value of a flag)
    start: tuple[str, ...] = tuple(OWN_CHECKPOINT)  # appended while the run's folder holds no checkpoint yet


@dataclass(frozen=True)
class PayoffPlan:
    output_dir: Path
    max_steps: int
    switch_step: int
    top_k: int
    runs: list[PayoffRun]
    learning_rate: float | None = None  # the cell's, given to every run (None: the command's)
    seed: int | None = None

    def run_dir(self, name: str) -> Path:
        return self.output_dir / name

    def steps_of(self, run: PayoffRun) -> int:
        """The optimizer steps ``run`` trains: (a) and (b) every step, (c) and (d) those after the switch."""
        return self.max_steps - (self.switch_step if run.name in (UPCYCLED, DENSE_CONTINUED) else 0)


@dataclass(frozen=True)
class PayoffGrid:
    """The cells of a payoff: one PayoffPlan per learning rate and seed, in output_dir itself when there is one."""

    output_dir: Path
    cells: list[PayoffPlan]
    learning_rates: list[float]
    seeds: list[int]
    tokens_per_step: int
    block_size: int

    @property
    def runs(self) -> int:
        return sum(len(cell.runs) for cell in self.cells)

    def steps(self, after: int = 0) -> int:
        """Optimizer steps over all runs (``after``: over those after the first ``after`` runs)."""
        return sum([cell.steps_of(run) for cell in self.cells for run in cell.runs][after:])

    def cost(self) -> str:
        steps = self.steps()
        return (f"{len(self.learning_rates)} learning rate(s) x {len(self.seeds)} seed(s) = {len(self.cells)} "
                f"payoff(s), {self.runs} runs, {steps:,} optimizer steps, {steps * self.tokens_per_step:,} tokens")


DENSE, MOE, UPCYCLED, DENSE_CONTINUED = "a_dense", "b_moe", "c_upcycled", "d_dense_continued"
VARIANT = "_variant"  # e1_variant, e2_variant, ...: (b) with the settings of each --moe_variant


def variant_name(index: int) -> str:
    return f"e{index + 1}{VARIANT}"


def is_variant(name: str) -> bool:
    return name.endswith(VARIANT)


def variant_flags(spec: str) -> list[str]:
    """A --moe_variant's train.py flags: "top_p=0.5,top_k=4" -> ["--top_p", "0.5", "--top_k", "4"]."""
    pairs = [part.strip().split("=", 1) for part in spec.split(",") if part.strip()]
    return [arg for pair in pairs for arg in ("--" + pair[0].strip(), pair[1].strip() if len(pair) > 1 else "")]


def variant_problems(cfg: RunConfig, train_argv: list[str], specs: list[str]) -> list[str]:
    """What is wrong with the --moe_variant settings: a part that is not name=value, a name that is no train.py
    setting or that the payoff sets per run, or MoE settings that do not go together."""
    known = set(_flat_settings(RunConfig()))
    problems = []
    for spec in specs:
        parts = [part.strip() for part in spec.split(",") if part.strip()]
        bad = [part for part in parts if "=" not in part]
        names = [part.split("=", 1)[0].strip() for part in parts if "=" in part]
        unknown = [name for name in names if name not in known]
        per_run = [name for name in names if name in SET_PER_RUN]
        if not parts or bad:
            problems.append(f"--moe_variant {spec!r}: give train.py settings as name=value separated by commas, "
                            "such as top_p=0.5,top_k=4")
        elif unknown:
            problems.append(f"--moe_variant {spec!r}: {', '.join(unknown)} is no train.py setting "
                            "(docs/configuration.md)")
        elif per_run:
            problems.append(f"--moe_variant {spec!r}: {', '.join(per_run)} is set by the payoff for each run")
        else:
            problems += [f"--moe_variant {spec!r}: {p}"
                         for p in moe_problems(parse_args([*train_argv, *variant_flags(spec)]).moe)]
    return problems


def plan_grid(cfg: RunConfig, train_argv: list[str], upcycle_at: float, learning_rates: list[float] | None,
              seeds: int, world_size: int, variants: list[str] | None = None) -> PayoffGrid:
    """The cells for each learning rate (default: the command's) and seeds seed, seed + 1, ...; with ``variants``
    (--moe_variant specs) a run e{i}_variant per spec in each cell; a ConfigError when the comparison cannot be made
    with these settings."""
    problems = payoff_problems(cfg, train_argv, upcycle_at) + variant_problems(cfg, train_argv, variants or [])
    if learning_rates is not None and cfg.was_given("learning_rate"):
        problems.append("--learning_rate and --sweep_lrs both set the learning rate; give one of them")
    if learning_rates is not None and (not learning_rates or any(lr <= 0 for lr in learning_rates)):
        problems.append(f"--sweep_lrs {learning_rates} must be positive learning rates, comma-separated (1e-3,2e-3)")
    if seeds < 1:
        problems.append(f"--seeds ({seeds}) must be at least 1")
    if problems:
        raise ConfigError(problems)
    out = Path(cfg.train.output_dir)
    lrs = learning_rates or [cfg.train.learning_rate]
    seed_list = [cfg.train.seed + i for i in range(seeds)]
    one = len(lrs) == 1 and len(seed_list) == 1
    cells = [plan_payoff(cfg, out if one else out / cell_name(lr, seed), upcycle_at, lr, seed, variants)
             for lr in lrs for seed in seed_list]
    t = cfg.train
    tokens_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.data.block_size * world_size
    return PayoffGrid(out, cells, lrs, seed_list, tokens_per_step, cfg.data.block_size)


def cell_name(learning_rate: float, seed: int) -> str:
    return f"lr{learning_rate:g}_seed{seed}"


def plan_payoff(cfg: RunConfig, out: Path, upcycle_at: float, learning_rate: float | None = None,
                seed: int | None = None, variants: list[str] | None = None) -> PayoffPlan:
    """The runs of one comparison, in ``out``, for the settings ``cfg`` (checked by plan_grid), at ``learning_rate``
    and ``seed`` (None: the command's), with a run per --moe_variant spec in ``variants``."""
    t, k = cfg.train, cfg.moe.top_k
    switch = switch_step(t.max_steps, t.eval_steps, upcycle_at)
    dense_config = str(Path(t.output_dir) / DENSE_CONFIG)  # one for every cell
    dense_saves = math.gcd(t.save_steps, switch) if t.save_steps else switch  # (c) and (d) start from the save at N
    cell = [*(["--learning_rate", repr(learning_rate)] if learning_rate is not None else []),
            *(["--seed", str(seed)] if seed is not None else [])]
    dense_model = ["--model_config", dense_config, "--moe_layers", NO_MOE_LAYERS]
    at_switch = str(RunFolder(out / DENSE).checkpoints.tag_dir(switch))
    runs = [
        PayoffRun(DENSE, f"(a) dense, FFN width {k} x F", [
            "--output_dir", str(out / DENSE), *dense_model, "--save_steps", str(dense_saves),
            "--save_total_limit", "0", *cell]),
        PayoffRun(MOE, "(b) MoE from scratch", ["--output_dir", str(out / MOE), "--expert_init", "random", *cell]),
        PayoffRun(UPCYCLED, f"(c) dense to step {switch}, then upcycled", [
            "--output_dir", str(out / UPCYCLED), "--model_config", dense_config, "--expert_init", "granular",
            "--granularity", str(k), "--upcycle_from_checkpoint", at_switch, *cell]),
        PayoffRun(DENSE_CONTINUED, f"(d) dense to step {switch}, then continued with a fresh optimizer state", [
            "--output_dir", str(out / DENSE_CONTINUED), *dense_model, *cell],
            start=("--resume_from_checkpoint", at_switch, "--reset_optimizer")),
    ]
    for i, spec in enumerate(variants or []):
        flags = variant_flags(spec)
        runs.append(PayoffRun(variant_name(i), f"({variant_name(i).split('_')[0]}) MoE from scratch with "
                              f"{' '.join(flags)}", ["--output_dir", str(out / variant_name(i)), "--expert_init",
                                                     "random", *cell, *flags]))
    return PayoffPlan(out, t.max_steps, switch, k, runs, learning_rate, seed)


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


def check_same_command(cfg: RunConfig, upcycle_at: float, grid: dict | None = None) -> None:
    """A payoff folder continues only the settings that started it (wherever the folder now is): the runs it kept
    were trained with those. ``grid``: the payoff's own settings of the grid (--sweep_lrs, --seeds)."""
    settings = {"upcycle_at": upcycle_at, **GRID_DEFAULTS, **(grid or {}), **_flat_settings(cfg)}
    path = Path(cfg.train.output_dir) / PLAN_FILE
    if not path.is_file():
        _atomic_write(path, json.dumps(settings, indent=2) + "\n")
        return
    # a setting newer than the folder's record was, for its runs, at its default
    recorded = {**_flat_settings(RunConfig()), **GRID_DEFAULTS, **json.loads(path.read_text())}
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
