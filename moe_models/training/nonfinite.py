"""The non-finite guard: an optimizer step whose loss or gradient norm is NaN or inf is applied on no rank, counted,
and after ``--max_nonfinite_steps`` of them in a row the run stops with an error that says what to try.

DeepSpeed's ZeRO (stages 1 and 2) and its fp16/bf16 optimizers already check the global gradient norm at every
step (a host read they make anyway; a NaN or inf loss gives non-finite gradients) and skip the update on every rank
alike; the guard reads their verdict, ``engine.was_step_applied()``, which costs nothing. ZeRO stage 0 in fp32
checks nothing: there the guard itself tests the reduced gradients before DeepSpeed steps and, when one is not
finite on any rank, lets DeepSpeed take the step with a stand-in optimizer that reports an overflow, so DeepSpeed
skips it exactly as it skips its own overflows. That costs one all-reduce and one host read per step, at stage 0
only.
"""

from __future__ import annotations

import deepspeed
import torch

from ..distributed import all_reduce_max


class NonFiniteError(RuntimeError):
    """The run stopped after too many non-finite steps in a row; the message says where and what to try."""


class NonFiniteGuard:
    def __init__(self, engine: deepspeed.DeepSpeedEngine, max_consecutive: int):
        self.engine = engine
        self.max_consecutive = max_consecutive  # 0: never stop
        self.checked_by_deepspeed = hasattr(engine.optimizer, "overflow")
        self.total = 0        # non-finite steps of this run, all skipped
        self.consecutive = 0

    def before_step(self) -> None:
        """Call right before the ``engine.step()`` that ends an accumulation window (stage 0 checks here)."""
        if self.checked_by_deepspeed:
            return
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())  # NaN or inf if any element is
        bad = (~torch.isfinite(norm)).float().reshape(1)
        if all_reduce_max(bad).item():  # expert gradients differ between ranks: all ranks decide together
            self.engine.optimizer = _OverflowedStep(self.engine.optimizer)

    def after_step(self) -> bool:
        """Call after the ``engine.step()`` that ends an accumulation window; whether that step was skipped."""
        if isinstance(self.engine.optimizer, _OverflowedStep):
            self.engine.optimizer = self.engine.optimizer.optimizer
        skipped = not self.engine.was_step_applied()
        self.total += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0
        return skipped

    @property
    def exhausted(self) -> bool:
        return 0 < self.max_consecutive <= self.consecutive


class _OverflowedStep:
    """Stands in for the optimizer during one ``engine.step()``: its step does nothing and it reports an overflow,
    so DeepSpeed clears the gradients, counts a skipped step and holds the LR schedule, as after its own overflows.
    Written here because DeepSpeed's stage 0 has no overflow check to turn on."""

    overflow = True

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)


@torch.no_grad()
def first_nonfinite_layer(model: torch.nn.Module, layers: list, input_ids: torch.Tensor) -> str | None:
    """Which MoE layer first gives non-finite router logits or output on ``input_ids`` (one forward, run only once
    the guard gave up), e.g. "MoE layer 2 (router logits)"; None when every layer stays finite."""
    found: list[str] = []

    def check(index: int):
        def hook(layer, inputs, output):
            if found:
                return
            x_TD = inputs[0].reshape(-1, inputs[0].shape[-1])
            if not torch.isfinite(layer.gate.logits(x_TD)).all():
                found.append(f"MoE layer {index} (router logits)")
            elif not torch.isfinite(output).all():
                found.append(f"MoE layer {index} (output)")
        return hook

    handles = [layer.register_forward_hook(check(i)) for i, layer in enumerate(layers)]
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None
