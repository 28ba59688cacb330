"""One bookkeeping for both trainers (train.py's loop, training/loop.py, and MoETrainer, training/hf_trainer.py): what a
training row holds besides the trainer's own loss, learning rate and position, kept once so that the two cannot
disagree.

    book = Bookkeeping(model, MoELayers(model), device, world_size, bf16=..., peak_tflops=..., nonfinite=...)
    book.start_step()                                  before an optimizer step's first forward
    book.add_micro_batch(input_ids, balance_loss, labels)  after each training forward (sums stay on the device)
    book.after_optimizer_step(step, skipped, say)      every rank: the non-finite guard counts (and, after too many
                                                       in a row, raises NonFiniteError with the message), the MoE
                                                       layers' biases move, the step is timed
    row = book.training_row()                          at a logging step: one all-reduce; the interval's balance
                                                       loss, MoE metrics, throughput and MFU, device figures
    warnings = book.collapse_warnings(step, row)       the router-collapse warnings the row starts or clears

FLOPs per token come from the sequence length of the first training batch in either trainer (PaLM's formula,
metrics/throughput.py), and tokens are counted from the batches themselves, so MFU has the same inputs in both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..data.batches import target_count
from ..metrics.collapse import CollapseMonitor
from ..metrics.device import DeviceInterval
from ..metrics.throughput import active_parameters, attention_dims, flops_per_token, resolve_peak_tflops, \
    throughput_metrics
from ..moe.model_layers import MoELayers
from ..run.distributed import sum_over_ranks
from .nonfinite import NonFiniteError, NonFiniteGuard, first_nonfinite_layer, nonfinite_message


@dataclass(frozen=True)
class NonFiniteTerms:
    """How a trainer's non-finite message names its settings: train.py's flags (``--learning_rate``) or
    ``TrainingArguments``' fields, their values now, the last checkpoint before a step, and how to resume."""

    max_consecutive: int                          # 0: never stop
    settings: dict[str, float]                    # learning_rate, warmup_steps, max_grad_norm, aux_loss_coef
    flag_prefix: str                              # "--" (train.py) or "" (TrainingArguments)
    limit: str                                    # the setting that stops the run, as the user writes it
    resume: str                                   # how to resume from a checkpoint
    checkpoint_before: Callable[[int], str]       # the last complete checkpoint before a step ("none")


class Bookkeeping:
    """A run's training rows, for either trainer (module docstring); the same calls on every rank."""

    SUMS = ("balance_loss", "micro_batches", "tokens", "trained_tokens")

    def __init__(self, model: nn.Module, moe_layers: MoELayers, device: torch.device, world_size: int, *,
                 bf16: bool, peak_tflops: Optional[float], nonfinite: NonFiniteTerms,
                 collapse: Optional[CollapseMonitor] = None):
        self.model, self.moe_layers, self.device, self.world_size = model, moe_layers, device, world_size
        self.guard = NonFiniteGuard(nonfinite.max_consecutive)
        self.nonfinite = nonfinite
        self.collapse = collapse  # the main process's; None elsewhere
        self.device_interval = DeviceInterval(device)
        self.peak_tflops, self.peak_source = resolve_peak_tflops(peak_tflops, device, bf16=bf16)
        self.flops_per_token: Optional[float] = None  # at the first training batch, from its sequence length
        self.sums = self.zero_sums()
        self.last_input_ids: Optional[torch.Tensor] = None
        self.started = 0.0
        self.seconds = self.total_seconds = 0.0  # optimizer steps' time: this interval's, the run's
        self.steps = 0  # optimizer steps in this interval (the same on every rank)

    def zero_sums(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in self.SUMS}

    # -- each step -------------------------------------------------------------------------------------------

    def start_step(self) -> None:
        self.started = time.perf_counter()

    def add_micro_batch(self, input_ids: torch.Tensor, balance_loss: torch.Tensor,
                        labels: Optional[torch.Tensor] = None) -> None:
        """A training forward's balance loss (summed over the MoE layers), tokens and the tokens its loss is on (the
        targets whose ``labels`` are not -100; without labels, every token's successor), added on the device."""
        if self.flops_per_token is None:
            self.flops_per_token = flops_per_token(active_parameters(self.model, self.moe_layers.counted),
                                                   *attention_dims(self.model.config), input_ids.shape[-1])
        self.sums["balance_loss"] += balance_loss.detach().double()
        self.sums["micro_batches"] += 1
        self.sums["tokens"] += input_ids.numel()
        self.sums["trained_tokens"] += target_count(input_ids if labels is None else labels)
        self.last_input_ids = input_ids

    def after_optimizer_step(self, step: int, skipped: bool, say: Callable[[str], None]) -> None:
        """Every rank, after optimizer step ``step`` (applied, or ``skipped`` as non-finite): the guard counts it, the
        MoE layers' biases move (not after a skipped step), the step's time is added. A skipped step is said with
        ``say`` (the trainer's console, the main process only); after ``max_consecutive`` in a row NonFiniteError
        ends the run with where the values first appear and what to try (a forward on every rank)."""
        self.guard.record(skipped)
        self.moe_layers.after_optimizer_step(applied=not skipped)
        elapsed = time.perf_counter() - self.started
        self.seconds += elapsed
        self.total_seconds += elapsed
        self.steps += 1
        if not skipped:
            return
        limit = self.nonfinite.max_consecutive
        say(f"step {step}: the loss or gradient norm is not finite; the update was skipped on every rank "
            f"({self.guard.consecutive} in a row" + (f"; the run stops at {limit})" if limit else ")"))
        if self.guard.exhausted:
            raise NonFiniteError(self.nonfinite_report(step))

    def nonfinite_report(self, step: int) -> str:
        """The message that ends a run after too many non-finite steps in a row (every rank must call it)."""
        terms, first = self.nonfinite, step - self.guard.consecutive + 1
        where = first_nonfinite_layer(self.model, self.moe_layers.layers, self.last_input_ids)
        return nonfinite_message(first, step, terms.limit, where, terms.checkpoint_before(first), terms.settings,
                                 terms.flag_prefix, terms.resume)

    # -- the logging interval ----------------------------------------------------------------------------------

    def training_row(self, extra_sums: Optional[dict[str, torch.Tensor]] = None) -> tuple[dict, dict]:
        """(the interval's row, the summed ``extra_sums`` and ``micro_batches``). The row: ``aux_loss`` (the balance
        loss summed over the MoE layers, mean over micro-batches and ranks), throughput and MFU, ``nonfinite_steps``,
        the MoE layers' metrics and the device figures, over all ranks in one all-reduce with the trainer's
        ``extra_sums``; the interval restarts."""
        extra_sums = extra_sums or {}
        summed = sum_over_ranks({**extra_sums, **self.sums, **self.moe_layers.interval_sums(self.device),
                                 **self.device_interval.sums()})
        micro_batches, tokens = float(summed["micro_batches"]), float(summed["tokens"])
        row = {"aux_loss": float(summed["balance_loss"]) / micro_batches} if micro_batches else {}
        moe_row = self.moe_layers.interval_metrics(summed)
        if self.steps and self.flops_per_token is not None:
            spent = self.moe_layers.spent_flops_per_token(self.flops_per_token, moe_row)
            row.update(throughput_metrics(tokens, self.steps, self.seconds, self.world_size, self.flops_per_token,
                                          self.peak_tflops, spent))
        row["nonfinite_steps"] = self.guard.total
        row["trained_tokens"] = int(summed["trained_tokens"])
        row.update(moe_row)
        row.update(self.device_interval.metrics(summed, tokens, self.world_size))
        self.sums, self.seconds, self.steps = self.zero_sums(), 0.0, 0
        return row, {name: summed[name] for name in (*extra_sums, "micro_batches")}

    def collapse_warnings(self, step: int, row: dict) -> list[dict]:
        """The router-collapse warning and clearance rows a training row of ``step`` starts or clears (the main
        process; [] elsewhere)."""
        return self.collapse.check({"step": step, **row}) if self.collapse else []
