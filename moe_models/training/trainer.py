"""The DeepSpeed engine loop: step, log, eval, save."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from ..data.batches import TrainBatches, eval_batches, model_inputs, target_count
from ..metrics.device import DeviceInterval
from ..metrics.domain_loss import domain_loss_metrics, domain_loss_sums
from ..metrics.sinks import MetricsLog, open_sinks, perplexity
from ..metrics.throughput import (active_parameters, attention_dims, flops_per_token, resolve_peak_tflops,
                                  throughput_metrics)
from ..moe.step import MoEStep
from ..run.config import ConfigError, RunConfig
from ..run.distributed import World, all_reduce_sum, sum_over_ranks
from ..run.folder import RunFolder
from . import checkpoint
from .checkpoint import TrainState
from .compile import compile_blocks
from .nonfinite import NonFiniteError, NonFiniteGuard, first_nonfinite_layer, guard_engine, nonfinite_message
from .preemption import StopRequest


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not biases or norms; then DeepSpeed splits expert params into their own groups
    (they are reduced over the expert-data-parallel group, not the whole world)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def build_engine(model: nn.Module, ds_config: dict, weight_decay: float,
                 config_file: str | None = None) -> deepspeed.DeepSpeedEngine:
    """The DeepSpeed engine; a parameter the DeepSpeed JSON (``config_file``, --deepspeed) gives its optimizer or
    schedule that the class does not take is a ConfigError naming the file and the key, not a library traceback."""
    try:
        engine, _, _, _ = deepspeed.initialize(model=model,
                                               model_parameters=optimizer_param_groups(model, weight_decay),
                                               config=ds_config)
    except TypeError as err:
        problem = unknown_parameter_problem(err, ds_config, config_file)
        if problem is None:
            raise
        raise ConfigError([problem]) from None
    return engine


def unknown_parameter_problem(err: TypeError, ds_config: dict, config_file: str | None) -> str | None:
    """Which section's "params" holds the keyword ``err`` says the optimizer or schedule class does not take."""
    found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    if found is None:
        return None
    key = found.group(1)
    for section in ("optimizer", "scheduler"):
        if key in (ds_config.get(section) or {}).get("params", {}):
            kind = ds_config[section].get("type")
            return (f"{section}.params.{key} in the DeepSpeed config {config_file or '(built in)'}: {section} "
                    f"{kind} takes no parameter {key!r}; remove it or fix its spelling (DeepSpeed passes "
                    f"{section}.params to the {kind} class as they are)")
    return None


def lm_loss_of(engine: deepspeed.DeepSpeedEngine, inputs: dict, **forward_kwargs) -> torch.Tensor:
    """Next-token loss of one forward of a batch's ``model_inputs`` (transformers shifts the labels)."""
    return engine(**{**forward_kwargs, **inputs}).loss


def forward_kwargs(compiled: bool) -> dict:
    """The training and eval forwards' extra arguments. Compiled blocks run without a KV cache: with one they would
    recompile for each layer's cache state. Eager ones keep transformers' default: without a cache, its mask code
    looks for packed sequences in the position ids with a host read in every forward (a traced forward skips it)."""
    return {"use_cache": False} if compiled else {}


class Trainer:
    def __init__(self, cfg: RunConfig, engine: deepspeed.DeepSpeedEngine, world: World, batches: TrainBatches,
                 eval_set, output_dir: Path, domains: Sequence[str] = ()):
        """``domains``: the run's domain list (the positions of the eval batches' domain_ids), for the routes per
        (domain, expert) at each eval; none: not counted."""
        self.cfg, self.engine, self.world = cfg, engine, world
        self.domains = list(domains)
        self.batches, self.eval_set = batches, eval_set
        self.folder = RunFolder(output_dir)
        self.output_dir = self.folder.path
        self.checkpoints = self.folder.checkpoints
        self.moe = MoEStep(engine.module)
        if cfg.train.gradient_checkpointing:  # transformers' own, per decoder block
            engine.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.compile:  # torch.compile per decoder block; the first steps take the compile
            compile_blocks(engine.module)
        self.forward_kwargs = forward_kwargs(cfg.train.compile)
        self.state = TrainState()
        self.eval_at_start = False  # an upcycled start is evaluated before its first update
        self.lr = 0.0
        guard_engine(engine)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.last_skipped_batch: torch.Tensor | None = None
        self.phase = "setup"  # what the ranks are doing, for the message when a collective times out
        self.log = MetricsLog(self.folder.metrics.path, enabled=world.is_main)
        self.sinks = open_sinks(cfg, world.is_main, self.output_dir, self.log, self.domains)  # wandb id: resume
        self.device_interval = DeviceInterval(world.device)
        self.tokens_per_step = (cfg.train.per_device_train_batch_size * cfg.data.block_size
                                * cfg.train.gradient_accumulation_steps * world.world_size)
        self.flops_per_token = flops_per_token(active_parameters(engine.module, self.moe.layers),
                                               *attention_dims(engine.module.config), cfg.data.block_size)
        self.peak_tflops, peak_source = resolve_peak_tflops(cfg.log.peak_tflops, world.device,
                                                            bf16=engine.bfloat16_enabled())
        if world.is_main and self.peak_tflops is None:
            print(f"mfu not reported: {peak_source}")

    def train(self) -> dict:
        """Train to max_steps (or until a stop signal); returns the run summary. Raises NonFiniteError after
        max_nonfinite_steps skipped steps in a row."""
        t = self.cfg.train
        self.first_step = self.state.step  # > 0 after a resume
        self.sinks.start(self.state.step)
        # Loss sums stay on the device and are read once per logging interval: no host sync per step.
        sums = self.zero_sums()
        interval_seconds = train_seconds = 0.0  # time in train steps only (eval and saves excluded)
        stopped_by = summary = None
        self.engine.train()
        if self.eval_at_start:
            self.sinks.log(self.evaluate())
        try:
            with StopRequest() as stop:
                while self.state.step < t.max_steps:
                    started = time.perf_counter()
                    self.phase = f"training step {self.state.step + 1} (forward, backward, optimizer step)"
                    for name, value in self.train_step().items():
                        sums[name] += value
                    self.state.step += 1
                    self.state.tokens_seen += self.tokens_per_step
                    step, last = self.state.step, self.state.step == t.max_steps
                    self.check_finite(step)
                    if step == 1 or step % t.logging_steps == 0 or last:
                        self.phase = f"the logging all-reduce after step {step}"
                        self.sinks.log(self.training_row(sums, interval_seconds + time.perf_counter() - started))
                        sums = self.zero_sums()
                        interval_seconds = 0.0
                    else:
                        interval_seconds += time.perf_counter() - started
                    train_seconds += time.perf_counter() - started
                    self.sinks.console.advance()
                    self.phase = f"the stop-signal vote after step {step}"
                    if stop.agreed():
                        stopped_by = stop.received or "a signal on another rank"
                        self.save()
                        self.sinks.console.print(f"stopped by {stopped_by} after step {step}: saved "
                                                 f"{self.checkpoints.tag_dir(step)}; relaunch with "
                                                 "--resume_from_checkpoint latest")
                        break
                    if (t.eval_steps and step % t.eval_steps == 0) or last:
                        self.sinks.log(self.evaluate())
                    if (t.save_steps and step % t.save_steps == 0) or last:
                        self.save()
            summary = {**self.summary(train_seconds), "stopped_by": stopped_by}
        finally:
            self.sinks.close(summary)  # the summary goes to wandb's run summary; None after an error
        return summary

    def zero_sums(self) -> dict[str, torch.Tensor]:
        """A logging interval's loss sums, on the device: LM loss, balance loss (summed over layers), micro-steps."""
        return {name: torch.zeros((), device=self.world.device)
                for name in ("lm_loss", "aux_loss", "micro_steps", "trained_tokens")}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns this step's loss sums."""
        sums = self.zero_sums()
        for _ in range(self.cfg.train.gradient_accumulation_steps):
            inputs = model_inputs(next(self.batches), self.world.device)
            input_ids = inputs["input_ids"]
            lm_loss = lm_loss_of(self.engine, inputs, **self.forward_kwargs)
            router_loss, balance = self.moe.router_loss(lm_loss)
            self.engine.backward(lm_loss + router_loss)
            self.lr = self.engine.get_lr()[0]  # the rate this step applies (the scheduler moves on in step())
            self.engine.step()
            sums["lm_loss"] += lm_loss.detach().float()
            sums["aux_loss"] += balance.detach().float()
            sums["micro_steps"] += 1
            sums["trained_tokens"] += target_count(inputs["labels"])
        skipped = not self.engine.was_step_applied()
        self.guard.record(skipped)
        if skipped:
            self.last_skipped_batch = input_ids
        self.moe.after_optimizer_step(applied=not skipped)
        return sums

    def check_finite(self, step: int) -> None:
        """Say so when the step just taken was skipped as non-finite; give up after too many in a row."""
        if self.guard.consecutive == 0:
            return
        limit = self.cfg.train.max_nonfinite_steps
        self.sinks.console.print(f"step {step}: the loss or gradient norm is not finite; the update was skipped on "
                                 f"every rank ({self.guard.consecutive} in a row"
                                 + (f"; the run stops at {limit})" if limit else ")"))
        if self.guard.exhausted:
            raise NonFiniteError(self.nonfinite_report(step))

    def nonfinite_report(self, step: int) -> str:
        t = self.cfg.train
        self.phase = f"the non-finite diagnosis after step {step}"
        where = first_nonfinite_layer(self.engine.module, self.moe.layers, self.last_skipped_batch)
        first = step - self.guard.consecutive + 1
        before = [tag for tag in self.checkpoints.complete_tags() if self.checkpoints.step_of(tag) < first]
        fixes = [f"a lower --learning_rate (now {t.learning_rate:g})",
                 f"a longer --warmup_steps (now {t.warmup_steps})", f"gradient clipping (--max_grad_norm, now {t.max_grad_norm:g})",
                 f"a smaller --aux_loss_coef (now {self.cfg.moe.aux_loss_coef:g})"]
        return nonfinite_message(first, step, f"--max_nonfinite_steps {t.max_nonfinite_steps}", where,
                                 str(before[-1]) if before else "none", fixes,
                                 "resume from that checkpoint (--resume_from_checkpoint TAG_FOLDER)")

    def training_row(self, sums: dict[str, torch.Tensor], seconds: float) -> dict:
        """The interval's metrics over all ranks (docs/metrics.md); one all-reduce for losses and MoE counters."""
        device = self.world.device
        summed = sum_over_ranks({**sums, **self.moe.interval_sums(device), **self.device_interval.sums()})
        micro_steps = float(summed["micro_steps"])
        steps_in_interval = micro_steps / self.world.world_size / self.cfg.train.gradient_accumulation_steps
        tokens = steps_in_interval * self.tokens_per_step
        grad_norm = self.engine.get_global_grad_norm()
        moe_row = self.moe.interval_metrics(summed)
        spent = self.moe.spent_flops_per_token(self.flops_per_token, moe_row)
        return {
            "step": self.state.step,
            "loss": float(summed["lm_loss"]) / micro_steps,
            "aux_loss": float(summed["aux_loss"]) / micro_steps,
            "lr": self.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            **throughput_metrics(tokens, steps_in_interval, seconds, self.world.world_size, self.flops_per_token,
                                 self.peak_tflops, spent),
            "tokens_seen": self.state.tokens_seen,
            "trained_tokens": int(summed["trained_tokens"]),
            "skipped_steps": self.engine.skipped_steps,
            "nonfinite_steps": self.guard.total,
            **moe_row,
            **self.device_interval.metrics(summed, tokens, self.world.world_size),
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean next-token loss over the eval set (capped at max_eval_batches per rank), over all ranks; with domains,
        the loss per domain and each MoE layer's routes per (domain, expert) and I(domain; expert)."""
        self.phase = f"evaluation at step {self.state.step}"
        self.engine.eval()
        sums = torch.zeros(2, device=self.world.device, dtype=torch.float64)  # loss x targets, targets
        by_domain = torch.zeros(2, len(self.domains), device=self.world.device, dtype=torch.float64)
        domain_routes = self.moe.domain_routes(len(self.domains), self.world.device, self.domains)
        for batch in eval_batches(self.eval_set, self.cfg.train.per_device_eval_batch_size, self.world.rank,
                                  self.world.world_size, self.cfg.train.max_eval_batches):
            inputs = model_inputs(batch, self.world.device)
            targets = target_count(inputs["labels"]).double()
            output = self.engine(**{**self.forward_kwargs, **inputs})
            sums += torch.stack([output.loss.double() * targets, targets])
            if "domain_ids" in batch and self.domains:  # the tokens the loss is on
                domain_ids = batch["domain_ids"].to(self.world.device).masked_fill(inputs["labels"] == -100, -1)
                by_domain += domain_loss_sums(output.logits, inputs["input_ids"], domain_ids, len(self.domains))
            domain_routes.add(batch.get("domain_ids"))
        self.engine.train()
        loss_sum, targets, *by_domain_sums = all_reduce_sum(torch.cat([sums, by_domain.flatten()])).tolist()
        eval_loss = loss_sum / targets
        row = {"step": self.state.step, "eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}
        n = len(self.domains)
        row.update(domain_loss_metrics([by_domain_sums[:n], by_domain_sums[n:]], self.domains))
        if self.cfg.moe.expert_init in ("copy", "copy_noise", "drop"):  # upcycled: how far experts moved from the FFN
            row.update(self.moe.expert_similarity())
        row.update(domain_routes.metrics())  # routes per (domain, expert) and I(domain; expert), per MoE layer
        return row

    def save(self) -> None:
        """DeepSpeed's checkpoint layout under checkpoints/global_step{N}/, made complete-or-absent."""
        self.phase = f"saving checkpoint {self.checkpoints.tag_of(self.state.step)}"
        checkpoint.save(self.engine, self.checkpoints, self.state, self.batches, self.world, self.cfg.moe,
                        self.cfg.train.save_total_limit,
                        {"wandb_run_id": self.sinks.wandb_run_id, "nonfinite_steps": self.guard.total})

    def resume(self, tag_dir: Path) -> None:
        """Continue from a checkpoint tag (what --resume_from_checkpoint resolved to)."""
        self.state, client_state = checkpoint.load(self.engine, tag_dir, self.batches, self.world,
                                                   self.cfg.moe, reset_optimizer=self.cfg.train.reset_optimizer)
        if RunFolder.of_tag(tag_dir).path.resolve() == self.folder.path.resolve():
            self.sinks.wandb_run_id = client_state.get("wandb_run_id")  # a resumed run continues its wandb run
        # another run's checkpoint (a branch of it) starts a wandb run of its own
        self.guard.total = client_state.get("nonfinite_steps", 0)
        self.sinks.resume(self.state.step)
        if self.world.is_main:
            print(f"Resumed from {tag_dir} at step {self.state.step}")

    def start_from_dense(self, tag_dir: Path) -> None:
        """Continue a dense run's schedule with this upcycled model (--upcycle_from_checkpoint): its step, tokens,
        LR schedule, data position and RNGs, with a fresh optimizer state; the first eval comes before any update."""
        self.state = checkpoint.load_position(self.engine, tag_dir, self.batches, self.world)
        self.eval_at_start = True
        if self.world.is_main:
            print(f"Upcycled the dense model of {tag_dir}; continuing its schedule at step {self.state.step}")

    def summary(self, train_seconds: float) -> dict:
        train_rows = [r for r in self.log.rows if "loss" in r]
        eval_rows = [r for r in self.log.rows if "eval_loss" in r]
        return {
            "steps": self.state.step,
            "first_loss": train_rows[0]["loss"] if train_rows else None,
            "last_loss": train_rows[-1]["loss"] if train_rows else None,
            "eval_loss": eval_rows[-1]["eval_loss"] if eval_rows else None,
            "tokens_seen": self.state.tokens_seen,
            "tokens_per_sec": (self.state.step - self.first_step) * self.tokens_per_step / max(train_seconds, 1e-9),
            "train_seconds": train_seconds,
        }
