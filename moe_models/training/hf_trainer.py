"""``MoETrainer``: the stock ``transformers.Trainer`` for a model converted by ``convert_to_moe`` (docs/hf-trainer.md).

It gives a run the MoE side of a step that train.py's loop gives (moe/model_layers.py, the contract both call), each where
the Trainer offers a place for it:

- ``compute_loss``: the router losses (each layer's ``aux_loss_coef`` x balance loss, ``router_z_loss_coef`` x
  z-loss) join the LM loss of every training micro-batch, scaled as the Trainer scales the LM loss under gradient
  accumulation;
- ``create_optimizer``: with DeepSpeed, expert parameters go into parameter groups of their own (DeepSpeed's
  ``split_params_into_different_moe_groups_for_optimizer``), which ZeRO needs and reduces over the expert-data-parallel
  group; also when the DeepSpeed JSON names the optimizer (then DeepSpeed builds it from these groups);
- a callback (``MoEStepCallback``): after each optimizer step the aux-loss-free biases move and the non-finite guard
  counts a skipped step, stopping the run after ``max_nonfinite_steps`` in a row with train.py's message
  (training/nonfinite.py; a plain torch optimizer step with a non-finite gradient is dropped first); it times the
  steps for tokens/s and MFU;
- ``log``: at each training log, the interval's MoE metrics (docs/metrics.md), tokens/s and MFU, energy and memory,
  summed over ranks, and the router-collapse warnings (metrics/collapse.py) they start or clear, printed by the main
  process and kept in ``collapse_warnings``; the console prints the summaries, without the per-layer and per-expert
  values (training/console_logs.py), which go to the reporters;
- on a CPU, each rank's threads are its share of the cores unless OMP_NUM_THREADS is set (run/threads.py), and freed
  large blocks stay with the process for reuse (run/cpu_memory.py);
- ``evaluation_loop``: with ``domain_ids`` in the eval data, each layer's routes per (domain, expert) and
  I(domain; expert) in the eval metrics;
- ``_save`` / ``save_model``: the MoE settings' record (run/folder.py) beside the weights, for export; at ep_size > 1 a
  final ``save_model`` also writes the DeepSpeed checkpoint, the only place that holds every expert.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch.distributed as dist
from accelerate.utils import DummyOptim
from deepspeed.moe.utils import is_moe_param_group, split_params_into_different_moe_groups_for_optimizer
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.batches import packed_forward
from ..metrics.collapse import CollapseMonitor, CollapseThresholds, console_line
from ..moe.parallel import parallel_problems
from ..moe.saved_settings import settings_of
from ..moe.model_layers import MoELayers
from ..run.config import ConfigError, MoEConfig
from ..run.distributed import init_world
from ..run.folder import RunFolder
from ..run.cpu_memory import keep_freed_memory
from ..run.threads import choose_cpu_threads
from .bookkeeping import Bookkeeping, NonFiniteTerms
from .console_logs import keep_console_to_summaries
from .ds_config import zero_stage
from .nonfinite import drop_nonfinite_gradients, guard_engine

DOMAIN_IDS = "domain_ids"  # a batch's per-token domain ids (data/): counted at eval, never given to the model


class MoETrainer(Trainer):
    """``transformers.Trainer`` for a model converted by ``convert_to_moe``; the same arguments, plus:

    - ``per_expert_metrics`` (default True): log each expert's load as its own scalar
      (``moe/layer_{i}/tokens_per_expert/{e}``...), besides the per-layer values;
    - ``max_nonfinite_steps`` (default 10, as train.py's flag): stop after this many optimizer steps in a row whose
      loss or gradient norm is not finite (each is skipped and counted in ``nonfinite_steps``); 0 = never stop;
    - ``peak_tflops``: one device's peak for ``mfu`` (default: the bf16 peak of a known GPU; none on a CPU);
    - ``collapse``: the router-collapse thresholds (``CollapseThresholds``, train.py's defaults);
    - ``domains``: the names of the eval data's ``domain_ids`` (default: their numbers).

    The MoE settings (router loss weights, aux-loss-free balancing, ep_size) are the ones the model was converted
    with, read from the model. With ep_size > 1 pass ``TrainingArguments(deepspeed=...)`` and launch with
    ``deepspeed``; a one-process DeepSpeed run needs no launcher (the one-rank process group is made here, as
    ``python train.py`` makes it).
    """

    def __init__(self, model=None, args=None, *trainer_args, per_expert_metrics: bool = True,
                 max_nonfinite_steps: int = 10, peak_tflops: float | None = None,
                 collapse: CollapseThresholds = CollapseThresholds(), domains: Sequence[str] | None = None,
                 **trainer_kwargs):
        if model is None:
            raise ValueError("MoETrainer needs model= (a model converted by moe_models.convert_to_moe); model_init "
                             "is not supported")
        self.moe_config, self.moe_layout = settings_of(model)
        check_parallelism(self.moe_config, args)
        if args is not None and args.deepspeed:
            # DeepSpeed joins the launched process group (or makes one of one rank without a launcher, as train.py
            # does), with the Trainer's timeout, and its CPU all-reduce buffers do not outlive the run in /dev/shm
            init_world(timeout_s=int(args.ddp_timeout))
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        for line in (choose_cpu_threads(), keep_freed_memory()):
            if line and self.is_world_process_zero():
                print(line, flush=True)
        keep_console_to_summaries(self)
        self.moe_layers = MoELayers(self.model)
        self.per_expert_metrics = per_expert_metrics
        self.domains = list(domains) if domains is not None else None
        self.collapse_warnings: list[dict] = []  # the warning and clearance rows, as train.py writes them
        a = self.args
        self.book = Bookkeeping(
            self.model, self.moe_layers, a.device, a.world_size, bf16=bool(a.bf16), peak_tflops=peak_tflops,
            collapse=CollapseMonitor(collapse, self.moe_config) if self.is_world_process_zero() else None,
            nonfinite=NonFiniteTerms(
                max_nonfinite_steps, {"learning_rate": a.learning_rate, "warmup_steps": a.warmup_steps,
                                      "max_grad_norm": a.max_grad_norm, "aux_loss_coef": self.moe_config.aux_loss_coef},
                "", f"max_nonfinite_steps={max_nonfinite_steps}",
                "resume from that checkpoint (trainer.train(resume_from_checkpoint=...))", self.checkpoint_before))
        self.domain_routes = None  # during an evaluation
        self.add_callback(MoEStepCallback(self))

    # -- the loss ---------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss plus, in training, the router losses of the same forward. The Trainer divides the loss
        by the accumulation steps afterwards unless the LM loss already is the micro-batch's share of the step's
        tokens (``num_items_in_batch``); the router loss, a mean over this micro-batch, then gets that division
        here. Either way a step's loss is its LM loss plus the mean router loss of its micro-batches.

        A batch with an ``attention_mask`` has its padding left out of routing (moe/padding.py); a packed one (with
        ``position_ids``, as train.py's conversational blocks) runs without the mask and a KV cache, as train.py runs
        it (data/batches.py)."""
        inputs = {name: value for name, value in inputs.items() if name != DOMAIN_IDS}
        self.moe_layers.ignore_padding(inputs.get("attention_mask"), self.args.device)
        inputs = packed_forward(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.model.training:
            extra, balance_loss = self.moe_layers.router_loss(loss)
            if not self.divides_loss_later(num_items_in_batch):
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra
            self.book.add_micro_batch(inputs["input_ids"], balance_loss, inputs.get("labels"))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's forward and backward; then the MoE layers forget the batch's padding (``compute_loss`` gave
        it to them, and a recompute in the backward needed it), so that no later forward reads it."""
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.moe_layers.ignore_padding(None, self.args.device)

    def divides_loss_later(self, num_items_in_batch) -> bool:
        """Whether ``Trainer.training_step`` divides what ``compute_loss`` returns by the accumulation steps (its own
        condition)."""
        return (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None

    def _set_signature_columns_if_needed(self):
        """The Trainer keeps only the columns the model's forward takes; ``domain_ids`` stays too (for the counts)."""
        super()._set_signature_columns_if_needed()
        if DOMAIN_IDS not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, DOMAIN_IDS]

    # -- the optimizer ----------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with DeepSpeed, its expert parameters in groups of their own. When the DeepSpeed
        JSON names the optimizer, DeepSpeed builds it from the Trainer's decay / no-decay groups, split the same way
        (DeepSpeed alone would put every parameter, norms included, under weight decay)."""
        optimizer = super().create_optimizer(model)
        if not self.is_deepspeed_enabled:
            return optimizer
        if isinstance(optimizer, DummyOptim):
            if not any(isinstance(group, dict) and is_moe_param_group(group) for group in optimizer.params):
                optimizer.params = expert_param_groups(self.decay_groups(model if model is not None else self.model))
        elif not any(is_moe_param_group(group) for group in optimizer.param_groups):
            optimizer.param_groups = expert_param_groups(optimizer.param_groups)
        return optimizer

    def decay_groups(self, model) -> list[dict]:
        """The Trainer's two groups: weight decay on the parameters it decays, none on biases and norms."""
        decay = set(self.get_decay_parameter_names(model))
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for name, p in trainable if name in decay], "weight_decay": self.args.weight_decay,
                 "name": "decay"},
                {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0, "name": "no_decay"}]

    # -- logging ----------------------------------------------------------------------------------------------

    def log(self, logs: dict, start_time=None) -> None:
        """A training log (the one with ``loss``; every rank logs it at the same step) gets the interval's MoE
        metrics, throughput, MFU, energy and memory (docs/metrics.md), over all ranks, and is checked for router
        collapse."""
        if "loss" in logs:
            moe = self.training_metrics()
            self.warn_of_collapse(moe)
            logs = {**logs, **moe}
        super().log(scalars(logs, self.per_expert_metrics), start_time)

    def training_metrics(self) -> dict:
        """The interval's metrics, summed over ranks by one all-reduce (training/bookkeeping.py); resets them."""
        return self.book.training_row()[0]

    def say(self, line: str) -> None:
        """A line on the main process's console."""
        if self.is_world_process_zero():
            print(line, flush=True)

    def warn_of_collapse(self, row: dict) -> None:
        """The router-collapse warnings a training row starts or clears: printed by the main process and kept."""
        for warning in self.book.collapse_warnings(self.state.global_step, row):
            self.collapse_warnings.append(warning)
            print(console_line(warning), flush=True)

    # -- evaluation -------------------------------------------------------------------------------------------

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's evaluation; with ``domain_ids`` in the data, each MoE layer's routes per (domain, expert)
        and I(domain; expert) join its metrics (every rank counts its own batches; one all-reduce)."""
        domains = self.eval_domains(dataloader)
        self.domain_routes = self.moe_layers.domain_routes(len(domains), self.args.device, domains) if domains else None
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            if self.domain_routes is not None:
                output.metrics.update({f"{metric_key_prefix}_{key}": value
                                       for key, value in self.domain_routes.metrics().items()})
        finally:
            self.domain_routes = None
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        domain_ids = inputs.pop(DOMAIN_IDS, None) if isinstance(inputs, dict) else None
        try:
            result = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self.moe_layers.ignore_padding(None, self.args.device)  # as after a training step
        if self.domain_routes is not None:
            self.domain_routes.add(domain_ids)
        return result

    def eval_domains(self, dataloader) -> list[str]:
        """The names of the eval data's domain ids: ``domains``, else their numbers (from the dataset's column);
        [] when the data has none."""
        if self.domains is not None:
            return self.domains
        dataset = getattr(dataloader, "dataset", None)
        if DOMAIN_IDS not in (getattr(dataset, "column_names", None) or []):
            return []
        highest = max((max(ids) for ids in dataset[DOMAIN_IDS] if len(ids)), default=-1)
        return [str(i) for i in range(highest + 1)]

    # -- the non-finite guard ---------------------------------------------------------------------------------

    def checkpoint_before(self, step: int) -> str:
        """The last ``checkpoint-N`` the Trainer saved before ``step`` ("none")."""
        saved = Path(self.args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        steps = sorted(int(path.name.split("-")[-1]) for path in saved
                       if path.name.split("-")[-1].isdigit() and int(path.name.split("-")[-1]) < step)
        return str(Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{steps[-1]}") if steps else "none"

    # -- saving -----------------------------------------------------------------------------------------------

    def _save(self, output_dir=None, state_dict=None) -> None:
        """The Trainer's files, plus the MoE settings' record (export reads it: moe-export)."""
        super()._save(output_dir, state_dict)
        folder = RunFolder(output_dir if output_dir is not None else self.args.output_dir)
        folder.write_moe_settings(self.moe_config, self.moe_layout, world_size=self.args.world_size)

    def save_model(self, output_dir=None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model``. At ep_size > 1 each rank holds only its experts, so the model file holds rank
        0's; a call of yours then also writes the DeepSpeed checkpoint (one file per expert), which export reads.
        Every rank must call it then (the Trainer's own checkpoints write it already)."""
        super().save_model(output_dir, _internal_call)
        if self.is_deepspeed_enabled and self.moe_config.ep_size > 1 and not _internal_call:
            self.model_wrapped.save_checkpoint(output_dir if output_dir is not None else self.args.output_dir)


class MoEStepCallback(TrainerCallback, ExportableState):
    """The MoE side of each optimizer step, on every rank: the step time; a plain torch optimizer's step with a
    non-finite gradient dropped; after the step, the non-finite guard's count (kept in the Trainer's checkpoints)
    and the aux-loss-free biases (``MoELayers.after_optimizer_step``)."""

    def __init__(self, trainer: MoETrainer | None = None):
        self.trainer = trainer
        self.dropped = False  # this step's gradients were dropped as non-finite (plain torch optimizer)

    def state(self) -> dict:
        total = self.trainer.book.guard.total if self.trainer is not None else 0
        return {"args": {}, "attributes": {"nonfinite_steps": total}}

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        saved = state.stateful_callbacks.get(type(self).__name__)  # a resumed run continues its count
        if isinstance(saved, dict):
            trainer.book.guard.total = saved.get("attributes", {}).get("nonfinite_steps", 0)
        state.stateful_callbacks[type(self).__name__] = self.state()  # checkpoints of older runs lack it
        if trainer.is_deepspeed_enabled:
            guard_engine(trainer.model_wrapped)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.book.start_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.trainer.is_deepspeed_enabled:  # DeepSpeed stepped already, checking as guard_engine made it
            self.dropped = drop_nonfinite_gradients(self.trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:
            skipped = not trainer.model_wrapped.was_step_applied()
        else:
            skipped, self.dropped = self.dropped, False
        trainer.book.after_optimizer_step(state.global_step, skipped, say=trainer.say)


def check_parallelism(moe: MoEConfig, args) -> None:
    """Refuse what cannot train the model correctly: experts split over ranks without DeepSpeed (a plain data-parallel
    wrapper would average each rank's different experts), and what expert parallelism cannot do with the world and
    the ZeRO stage (moe/parallel.py, the rules train.py checks too)."""
    deepspeed_config = getattr(args, "hf_deepspeed_config", None) if args is not None else None
    if moe.ep_size > 1 and deepspeed_config is None:
        raise ValueError(f"the model was converted with ep_size {moe.ep_size}: expert parallelism needs DeepSpeed. "
                         "Pass TrainingArguments(deepspeed=...) (a DeepSpeed JSON path or dict) and launch with "
                         f"`deepspeed --num_gpus N script.py`, N a multiple of {moe.ep_size}; or convert with "
                         "ep_size 1")
    if deepspeed_config is not None:
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        problems = parallel_problems(moe, world_size, zero_stage(deepspeed_config.config))
        if problems:
            raise ConfigError(problems)


def expert_param_groups(groups: list[dict]) -> list[dict]:
    """``groups`` with their expert parameters moved into groups of their own (one per expert-parallel size, keeping
    each group's settings); empty groups dropped."""
    named = [{**group, "name": group.get("name", f"group_{i}")} for i, group in enumerate(groups)]
    return [group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]]


def scalars(row: dict, per_expert: bool) -> dict:
    """A metrics row as the Trainer's loggers take it: numbers only. A per-expert list becomes one entry per expert,
    ``key/{e}`` (or is left out without ``per_expert``); a table (a list of lists) one entry per cell."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, list):
            if per_expert:
                for e, item in enumerate(value):
                    flat.update(scalars({f"{key}/{e}": item}, per_expert))
        else:
            flat[key] = value
    return flat
