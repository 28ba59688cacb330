"""train.py's loop around the DeepSpeed engine (training/engine.py builds it): step, log, eval, save."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import deepspeed
import torch

from ..data.batches import TrainBatches, eval_batches, model_inputs, target_count
from ..hf.in_place import fused_experts_of
from ..hf.in_place_bias import family_balance_fixes
from ..metrics.collapse import CollapseMonitor, CollapseThresholds
from ..metrics.domain_loss import domain_loss_metrics, domain_loss_sums
from ..metrics.sinks import MetricsLog, open_sinks, perplexity
from ..moe.model_layers import MoELayers
from ..run.config import RunConfig
from ..run.distributed import World, all_reduce_sum
from ..run.folder import RunFolder
from . import checkpoint
from .bookkeeping import Bookkeeping, NonFiniteTerms
from .checkpoint import TrainState
from .compile import compile_blocks
from .nonfinite import guard_engine
from .preemption import StopRequest


def lm_loss_of(engine: deepspeed.DeepSpeedEngine, inputs: dict, **forward_kwargs) -> torch.Tensor:
    """Next-token loss of one forward of a batch's ``model_inputs`` (transformers shifts the labels)."""
    return engine(**{**forward_kwargs, **inputs}).loss


def forward_kwargs(compiled: bool) -> dict:
    """The training and eval forwards' extra arguments. Compiled blocks run without a KV cache: with one they would
    recompile for each layer's cache state. Eager ones keep transformers' default: without a cache, its mask code
    looks for packed sequences in the position ids with a host read in every forward (a traced forward skips it)."""
    return {"use_cache": False} if compiled else {}


class TrainLoop:
    def __init__(self, cfg: RunConfig, engine: deepspeed.DeepSpeedEngine, world: World, batches: TrainBatches,
                 eval_set, folder: RunFolder, domains: Sequence[str] = ()):
        """``folder``: the run's output folder; ``domains``: the run's domain list (the positions of the eval batches'
        domain_ids), for the routes per (domain, expert) at each eval; none: not counted."""
        self.cfg, self.engine, self.world = cfg, engine, world
        self.domains = list(domains)
        self.batches, self.eval_set = batches, eval_set
        self.folder = folder
        self.output_dir = self.folder.path
        self.checkpoints = self.folder.checkpoints
        self.moe_layers = MoELayers(engine.module)
        if cfg.train.gradient_checkpointing:  # transformers' own, per decoder block
            engine.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.compile:  # torch.compile per decoder block; the first steps take the compile
            compile_blocks(engine.module)
        self.forward_kwargs = forward_kwargs(cfg.train.compile)
        self.state = TrainState()
        self.eval_at_start = False  # an upcycled start is evaluated before its first update
        self.lr = 0.0
        guard_engine(engine)
        self.phase = "setup"  # what the ranks are doing, for the message when a collective times out
        self.log = MetricsLog(self.folder.metrics.path, enabled=world.is_main)
        self.sinks = open_sinks(cfg, world.is_main, self.output_dir, self.log, self.domains)  # wandb id: resume
        t = cfg.train
        self.book = Bookkeeping(
            engine.module, self.moe_layers, world.device, world.world_size, bf16=engine.bfloat16_enabled(),
            peak_tflops=cfg.log.peak_tflops,
            collapse=CollapseMonitor(CollapseThresholds.of(cfg.log), cfg.moe, family_fixes=(
                family_balance_fixes(engine.module, cfg.moe.router_bias_update_rate)
                if fused_experts_of(engine.module) else None)) if world.is_main else None,
            nonfinite=NonFiniteTerms(
                t.max_nonfinite_steps, {"learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps,
                                        "max_grad_norm": t.max_grad_norm, "aux_loss_coef": cfg.moe.aux_loss_coef},
                "--", f"--max_nonfinite_steps {t.max_nonfinite_steps}",
                "resume from that checkpoint (--resume_from_checkpoint TAG_FOLDER)", self.checkpoint_before))
        self.tokens_per_step = (t.per_device_train_batch_size * cfg.data.block_size
                                * t.gradient_accumulation_steps * world.world_size)
        if world.is_main and self.book.peak_tflops is None:
            print(f"mfu not reported: {self.book.peak_source}")

    def train(self) -> dict:
        """Train to max_steps (or until a stop signal); returns the run summary. Raises NonFiniteError after
        max_nonfinite_steps skipped steps in a row."""
        t = self.cfg.train
        self.first_step = self.state.step  # > 0 after a resume
        self.sinks.start(self.state.step)
        # Loss sums stay on the device and are read once per logging interval: no host sync per step.
        lm_loss_sum = self.zero()
        stopped_by = summary = None
        self.engine.train()
        if self.eval_at_start:
            self.sinks.log(self.evaluate())
        try:
            with StopRequest() as stop:
                while self.state.step < t.max_steps:
                    self.phase = f"training step {self.state.step + 1} (forward, backward, optimizer step)"
                    lm_loss_sum += self.train_step()
                    self.state.step += 1
                    self.state.tokens_seen += self.tokens_per_step
                    step, last = self.state.step, self.state.step == t.max_steps
                    if step == 1 or step % t.logging_steps == 0 or last:
                        self.phase = f"the logging all-reduce after step {step}"
                        self.log_training_row(lm_loss_sum)
                        lm_loss_sum = self.zero()
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
            summary = {**self.summary(self.book.total_seconds), "stopped_by": stopped_by}
        finally:
            self.sinks.close(summary)  # the summary goes to wandb's run summary; None after an error
        return summary

    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.world.device)

    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns its LM loss summed over them
        (on the device). Raises NonFiniteError after max_nonfinite_steps skipped steps in a row."""
        self.book.start_step()
        lm_loss_sum = self.zero()
        for _ in range(self.cfg.train.gradient_accumulation_steps):
            batch = next(self.batches)
            self.moe_layers.ignore_padding(batch.get("attention_mask"), self.world.device)
            inputs = model_inputs(batch, self.world.device)
            input_ids = inputs["input_ids"]
            lm_loss = lm_loss_of(self.engine, inputs, **self.forward_kwargs)
            router_loss, balance_loss = self.moe_layers.router_loss(lm_loss)
            self.engine.backward(lm_loss + router_loss)
            self.lr = self.engine.get_lr()[0]  # the rate this step applies (the scheduler moves on in step())
            self.engine.step()
            lm_loss_sum += lm_loss.detach().double()
            self.book.add_micro_batch(input_ids, balance_loss, inputs["labels"])
        self.book.after_optimizer_step(self.state.step + 1, skipped=not self.engine.was_step_applied(),
                                       say=self.sinks.console.print)
        return lm_loss_sum

    def checkpoint_before(self, step: int) -> str:
        """The last complete checkpoint saved before ``step`` ("none")."""
        before = [tag for tag in self.checkpoints.complete_tags() if self.checkpoints.step_of(tag) < step]
        return str(before[-1]) if before else "none"

    def log_training_row(self, lm_loss_sum: torch.Tensor) -> None:
        """The interval's row over all ranks (docs/metrics.md): one all-reduce for the losses, the MoE counters and
        the device figures; then the router-collapse warnings it starts or clears."""
        book_row, summed = self.book.training_row({"lm_loss": lm_loss_sum})
        grad_norm = self.engine.get_global_grad_norm()
        row = {
            "step": self.state.step,
            "loss": float(summed["lm_loss"]) / float(summed["micro_batches"]),
            "lr": self.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": self.engine.skipped_steps,
            **book_row,
        }
        self.sinks.log(row)
        self.sinks.warn(self.book.collapse_warnings(self.state.step, row))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean next-token loss over the eval set (capped at max_eval_batches per rank), over all ranks; with domains,
        the loss per domain and each MoE layer's routes per (domain, expert) and I(domain; expert)."""
        self.phase = f"evaluation at step {self.state.step}"
        self.engine.eval()
        sums = torch.zeros(2, device=self.world.device, dtype=torch.float64)  # loss x targets, targets
        by_domain = torch.zeros(2, len(self.domains), device=self.world.device, dtype=torch.float64)
        domain_routes = self.moe_layers.domain_routes(len(self.domains), self.world.device, self.domains)
        for batch in eval_batches(self.eval_set, self.cfg.train.per_device_eval_batch_size, self.world.rank,
                                  self.world.world_size, self.cfg.train.max_eval_batches):
            self.moe_layers.ignore_padding(batch.get("attention_mask"), self.world.device)
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
            row.update(self.moe_layers.expert_similarity())
        row.update(domain_routes.metrics())  # routes per (domain, expert) and I(domain; expert), per MoE layer
        return row

    def save(self) -> None:
        """DeepSpeed's checkpoint layout under checkpoints/global_step{N}/, made complete-or-absent."""
        self.phase = f"saving checkpoint {self.checkpoints.tag_of(self.state.step)}"
        checkpoint.save(self.engine, self.checkpoints, self.state, self.batches, self.world, self.cfg.moe,
                        self.cfg.train.save_total_limit,
                        {"wandb_run_id": self.sinks.wandb_run_id, "nonfinite_steps": self.book.guard.total})

    def resume(self, tag_dir: Path) -> None:
        """Continue from a checkpoint tag (what --resume_from_checkpoint resolved to)."""
        self.state, client_state = checkpoint.load(self.engine, tag_dir, self.batches, self.world,
                                                   self.cfg.moe, reset_optimizer=self.cfg.train.reset_optimizer)
        if RunFolder.of_tag(tag_dir).path.resolve() == self.folder.path.resolve():
            self.sinks.wandb_run_id = client_state.get("wandb_run_id")  # a resumed run continues its wandb run
        # another run's checkpoint (a branch of it) starts a wandb run of its own
        self.book.guard.total = client_state.get("nonfinite_steps", 0)
        for row in self.sinks.resume(self.state.step):  # the collapse monitor goes on as if never stopped
            self.book.collapse_warnings(row["step"], row)
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
