"""The non-finite guard, for both trainers: an optimizer step whose loss or gradient norm is NaN or inf is applied on no
rank, counted, and after ``max_nonfinite_steps`` of them in a row the run stops with an error that says what to try.

Who skips the step:
- DeepSpeed's ZeRO (stages 1 and 2) and its fp16/bf16 optimizers already check the global gradient norm at every
  step (a host read they make anyway; a NaN or inf loss gives non-finite gradients) and skip the update on every
  rank alike; the guard reads their verdict, ``engine.was_step_applied()``, which costs nothing.
- DeepSpeed's ZeRO stage 0 in fp32 checks nothing: ``guard_engine`` gives the engine an optimizer that tests the
  reduced gradients before it steps and, when one is not finite on any rank, steps nothing and reports an overflow,
  so DeepSpeed skips the step exactly as it skips its own overflows (its LR schedule holds). That costs one
  all-reduce and one host read per step, at stage 0 only.
- A plain torch optimizer (MoETrainer without DeepSpeed): ``drop_nonfinite_gradients`` runs the same test right
  before the optimizer step and, when it fails, drops every gradient, so that torch's optimizers step no parameter
  (no moment, no weight decay); the Trainer's LR schedule still moves on, as the Trainer counts every step.
"""

from __future__ import annotations

import deepspeed
import torch

from ..run.distributed import all_reduce_max


class NonFiniteError(RuntimeError):
    """The run stopped after too many non-finite steps in a row; the message says where and what to try."""


class NonFiniteGuard:
    """Counts the skipped non-finite steps of a run (``total``, also across a resume) and those in a row."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive  # 0: never stop
        self.total = 0
        self.consecutive = 0

    def record(self, skipped: bool) -> None:
        """After each optimizer step: whether it was skipped as non-finite."""
        self.total += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0

    @property
    def exhausted(self) -> bool:
        return 0 < self.max_consecutive <= self.consecutive


def gradients_finite(parameters) -> bool:
    """Whether every gradient of ``parameters`` is finite on every rank (one all-reduce and one host read): expert
    gradients differ between ranks, so all ranks decide together."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())  # NaN or inf if any element is
    bad = (~torch.isfinite(norm)).float().reshape(1)
    return not all_reduce_max(bad).item()


def guard_engine(engine: deepspeed.DeepSpeedEngine) -> None:
    """Make a DeepSpeed engine skip non-finite steps where its optimizer does not check them (stage 0 in fp32)."""
    if not hasattr(engine.optimizer, "overflow"):
        engine.optimizer = FiniteStepOptimizer(engine.optimizer, engine.module)


def drop_nonfinite_gradients(model: torch.nn.Module) -> bool:
    """Right before a plain optimizer step: drop every gradient when one is not finite on any rank, so that the step
    changes nothing; returns whether it did (the step is skipped)."""
    if gradients_finite(model.parameters()):
        return False
    for param in model.parameters():
        param.grad = None
    return True


class FiniteStepOptimizer:
    """Wraps a DeepSpeed engine's optimizer (stage 0): its step tests the gradients first; when one is not finite it
    steps nothing and reports an overflow, so DeepSpeed clears the gradients, counts a skipped step and holds the LR
    schedule, as after its own overflows. Written here because DeepSpeed's stage 0 has no overflow check to turn on.
    Everything else goes to the wrapped optimizer."""

    def __init__(self, optimizer, module: torch.nn.Module):
        self.optimizer, self.module = optimizer, module
        self.overflow = False

    def step(self, *args, **kwargs):
        self.overflow = not gradients_finite(self.module.parameters())
        if not self.overflow:
            return self.optimizer.step(*args, **kwargs)
        return None

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)


def nonfinite_message(first: int, step: int, limit: str, where: str, checkpoint_before: str,
                      settings: dict[str, float], flag_prefix: str, resume: str) -> str:
    """The error that ends a run after ``limit`` non-finite steps in a row (steps ``first``..``step``): where the
    values first appear (``first_nonfinite_layer``), the last checkpoint saved before, the settings that usually fix
    it with their values now (``settings``: learning_rate, warmup_steps, max_grad_norm, aux_loss_coef, named with
    ``flag_prefix``: "--" for train.py's flags, "" for TrainingArguments' fields) and how to resume. ``limit``: the
    setting that stopped it, as the user wrote it."""
    n, p = step - first + 1, flag_prefix
    fixes = [f"a lower {p}learning_rate (now {settings['learning_rate']:g})",
             f"a longer {p}warmup_steps (now {settings['warmup_steps']})",
             f"gradient clipping ({p}max_grad_norm, now {settings['max_grad_norm']:g})",
             f"a smaller {p}aux_loss_coef (now {settings['aux_loss_coef']:g})"]
    return (f"steps {first}..{step}: {n} optimizer steps in a row had a non-finite loss or gradient norm and were "
            f"skipped on every rank ({limit}); {where}. The last checkpoint saved before step "
            f"{first} is {checkpoint_before}. What usually fixes it: {', '.join(fixes)}, or fp32 where bf16 "
            f"overflows; then {resume}, or start over.")


@torch.no_grad()
def first_nonfinite_layer(model: torch.nn.Module, layers: list, input_ids: torch.Tensor) -> str:
    """Where the first non-finite router logits or MoE output appear on ``input_ids`` (one forward, run only once the
    guard gave up), e.g. "the first non-finite value on the last batch appears in MoE layer 2 (router logits)"."""
    found: list[str] = []

    def check(index: int):
        def hook(layer, inputs, output):
            if found:
                return
            x_TD = inputs[0].reshape(-1, inputs[0].shape[-1])
            if not torch.isfinite(layer.router.logits(x_TD)).all():
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
    if found:
        return f"the first non-finite value on the last batch appears in {found[0]}"
    return ("every MoE layer's router logits and output are finite on the last batch, so the non-finite values arise "
            "elsewhere (attention, embeddings, the loss or the gradients)")
