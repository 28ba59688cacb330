"""The Trainer's console with the summaries only: its progress bar and printer (``ProgressCallback``,
``PrinterCallback``) print each log without the per-layer and per-expert MoE values (``moe/layer_{i}/...``, dozens
of numbers a line), which still go to the reporters (wandb, TensorBoard) and ``state.log_history``."""

from __future__ import annotations

from transformers.trainer_callback import PrinterCallback, ProgressCallback

PER_LAYER = "moe/layer_"


def summaries(logs: dict | None) -> dict:
    return {key: value for key, value in (logs or {}).items() if PER_LAYER not in key}


class SummaryProgressCallback(ProgressCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=summaries(logs), **kwargs)


class SummaryPrinterCallback(PrinterCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=summaries(logs), **kwargs)


CONSOLE_CALLBACKS = {ProgressCallback: SummaryProgressCallback, PrinterCallback: SummaryPrinterCallback}


def keep_console_to_summaries(trainer) -> None:
    """Swap the Trainer's console callbacks for the ones that print the summaries only."""
    for stock, summary in CONSOLE_CALLBACKS.items():
        if trainer.pop_callback(stock) is not None:
            trainer.add_callback(summary)
