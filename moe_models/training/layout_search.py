"""`train.py --plan --plan_cluster C --plan_search`: every parallel layout of the same run that fits a device, ranked by
the predicted tokens/s (training/step_time.py), with the reason the best one wins.

A layout keeps the model, the world and the tokens per rank and step (micro-batch x accumulation); it varies ep_size
(every value that divides the world and the experts), the ZeRO stage (0, 1, 2), the micro-batch (each divisor of the
tokens per step, accumulation making up the rest) and activation checkpointing.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass

from ..moe.parallel import parallel_problems
from ..run.cli import given_flags
from ..run.config import MoEConfig
from ..run.moe_layout import expert_counts
from .clusters import Cluster, resolve_cluster
from .preflight import GIB, ModelShape, Setup, all_to_all_bytes_per_step, bytes_per_rank, predicted_shape
from .step_time import StepTime, predict
from .validate import checked_moe

PARTS = ("compute", "all_to_all", "gradients", "optimizer")
# what a layout sets, and the plan's own flags: neither goes into the launch command from the plan's command line
LAYOUT_FLAGS = frozenset({"ep_size", "deepspeed", "per_device_train_batch_size", "gradient_accumulation_steps",
                          "gradient_checkpointing"})
PLAN_FLAGS = frozenset({"plan", "device_memory_gb", "plan_cluster", "plan_nodes", "plan_search", "plan_world_size"})


@dataclass(frozen=True)
class Layout:
    setup: Setup
    step: StepTime
    memory_gib: float

    def as_dict(self) -> dict:
        return {"flags": self.flags(), "memory_gib": self.memory_gib, **self.step.as_dict()}

    def flags(self) -> str:
        s = self.setup
        return (f"--ep_size {s.ep_size} --deepspeed zero{s.zero_stage} --per_device_train_batch_size {s.micro_batch} "
                f"--gradient_accumulation_steps {s.gradient_accumulation_steps}"
                + (" --gradient_checkpointing" if s.activation_checkpointing else ""))


def layouts(shape: ModelShape, setup: Setup, num_experts: int) -> list[Setup]:
    """Every layout of ``setup``'s run (same world, same tokens per rank and step)."""
    per_step = setup.micro_batch * setup.gradient_accumulation_steps
    ep_sizes = [p for p in range(1, setup.world_size + 1)
                if not parallel_problems(MoEConfig(num_experts=num_experts, ep_size=p), setup.world_size)]
    return [dataclasses.replace(setup, ep_size=p, zero_stage=zero, micro_batch=micro,
                                gradient_accumulation_steps=per_step // micro, activation_checkpointing=checkpointing)
            for p in ep_sizes for zero in (0, 1, 2) for micro in range(1, per_step + 1) if per_step % micro == 0
            for checkpointing in (False, True)]


def search(shape: ModelShape, setup: Setup, ds_config: dict, cluster: Cluster, num_experts: int,
           memory_gib: float) -> list[Layout]:
    """The layouts that fit ``memory_gib``, fastest first (ties: less memory first)."""
    found = []
    for candidate in layouts(shape, setup, num_experts):
        memory = bytes_per_rank(shape, candidate)["total"] / GIB
        if memory > memory_gib:
            continue
        step = predict(shape, candidate, ds_config, cluster, all_to_all_bytes_per_step(shape, candidate))
        if step is not None:
            found.append(Layout(candidate, step, memory))
    return sorted(found, key=lambda layout: (-layout.step.tokens_per_sec, layout.memory_gib))


def search_plan(cfg, result: dict, ds_config: dict) -> list[dict]:
    """--plan_search: the layouts of the plan ``result`` (preflight.plan_with_fit, made with --plan_cluster) that fit
    its device memory, fastest first, as ``Layout.as_dict``."""
    ranked = search(predicted_shape(result), Setup(**result["setup"]), ds_config,
                    resolve_cluster(cfg.train.plan_cluster), math.gcd(*expert_counts(checked_moe(cfg))),
                    result["device_memory_gb"])
    return [layout.as_dict() for layout in ranked]


def launch_command(cfg, best: dict, world_size: int, devices_per_node: int) -> str:
    """The command that trains the plan's run with the layout ``best`` (``Layout.as_dict``): the launcher for the
    plan's world (one node: --num_gpus; more: a hostfile), train.py, the plan's flags without the plan's own, and the
    layout's flags in place of those it sets."""
    nodes = world_size // devices_per_node
    launcher = ["--hostfile", "HOSTFILE"] if nodes > 1 else ["--num_gpus", str(world_size)]
    return shlex.join(["deepspeed", *launcher, "train.py", *given_flags(cfg, PLAN_FLAGS | LAYOUT_FLAGS),
                       *best["flags"].split()])


def launch_lines(result: dict) -> list[str]:
    """The console's lines for the plan's ``launch_command``: the command, and for several nodes what HOSTFILE is."""
    if not result.get("launch_command"):
        return []
    nodes = result["setup"]["world_size"] // result["cluster"]["devices_per_node"]
    lines = [f"launch the fastest layout: {result['launch_command']}"]
    if nodes > 1:
        lines.append(f"  (HOSTFILE: {nodes} lines 'HOSTNAME slots={result['cluster']['devices_per_node']}', one per "
                     "node; or launch/multi_node_hostfile.sh HOSTFILE with the same train.py flags, which checks it "
                     "first)")
    return lines


def why_best(ranked: list[dict]) -> str:
    """One sentence: by how much the best layout (``Layout.as_dict``) beats the next layout predicted differently,
    which part of the step it saves most on, and how many layouts tie with it."""
    if not ranked:
        return "no layout fits"
    best = ranked[0]
    ties = [layout for layout in ranked[1:]
            if abs(layout["tokens_per_sec"] - best["tokens_per_sec"]) <= 1e-9 * best["tokens_per_sec"]]
    tied = (f"; {len(ties)} more predict the same (e.g. {ties[0]['flags']}; listed by memory)" if ties else "")
    others = ranked[1 + len(ties):]
    if not others:
        return "the only prediction among the layouts that fit" + tied
    next_ = others[0]
    gain = best["tokens_per_sec"] / next_["tokens_per_sec"] - 1
    saved = {part: next_["seconds"][part] - best["seconds"][part] for part in PARTS}
    part = max(saved, key=saved.get)
    return (f"{100 * gain:.1f}% more tokens/s than the next ({next_['flags']}): {1e3 * saved[part]:.3g} ms less "
            f"{part.replace('_', '-')} per step" + tied)


def search_table(ranked: list[dict], cluster_name: str, memory_gib: float, show: int = 10) -> str:
    """The console's view of the plan's ``search`` (``Layout.as_dict`` per layout, fastest first)."""
    rows = [f"Layouts that fit {memory_gib:g} GiB on {cluster_name}, fastest first ({len(ranked)} fit"
            + (f", {show} shown; all in plan.json" if len(ranked) > show else "") + "):",
            f"  {'tokens/s':>12} {'MFU':>6} {'step ms':>9} {'GiB':>7}  {'compute/a2a/grad/opt %':<23} flags"]
    for layout in ranked[:show]:
        shares = "/".join(f"{100 * layout['shares'][part]:.0f}" for part in PARTS)
        rows.append(f"  {layout['tokens_per_sec']:12.4g} {100 * layout['mfu']:5.1f}% "
                    f"{1e3 * layout['step_time']:9.2f} {layout['memory_gib']:7.2f}  {shares:<23} {layout['flags']}")
    rows.append(f"  best: {why_best(ranked)}")
    return "\n".join(rows)
