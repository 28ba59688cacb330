"""``MoETrainer``: the stock ``transformers.Trainer`` for a model converted by ``convert_to_moe`` (docs/hf-trainer.md).

What it adds to the Trainer, each where the Trainer offers a place for it:

- ``compute_loss``: the router losses (``aux_loss_coef`` x balance loss, ``router_z_loss_coef`` x z-loss) join the
  LM loss of every training micro-batch, scaled as the Trainer scales the LM loss under gradient accumulation;
- ``create_optimizer``: with DeepSpeed, expert parameters go into parameter groups of their own (DeepSpeed's
  ``split_params_into_different_moe_groups_for_optimizer``), which ZeRO needs and reduces over the expert-data-parallel
  group; also when the DeepSpeed JSON names the optimizer (then DeepSpeed builds it from these groups);
- a callback's ``on_step_end``: ``end_of_step`` after each optimizer step (aux-loss-free bias, global-batch loss);
- ``log``: at each training log, the MoE metrics of the interval (docs/metrics.md), summed over ranks;
- ``_save`` / ``save_model``: ``moe_config.json`` beside the weights, for export; at ep_size > 1 a final
  ``save_model`` also writes the DeepSpeed checkpoint, the only place that holds every expert.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from accelerate.utils import DummyOptim
from deepspeed.moe.utils import is_moe_param_group, split_params_into_different_moe_groups_for_optimizer
from transformers import Trainer, TrainerCallback

from ..config import MoEConfig
from ..distributed import all_reduce_sum, init_world
from ..metrics.interval import IntervalStats
from ..moe.balance import end_of_step
from ..moe.layer import MoEFeedForward, balance_loss, moe_layers_of, router_loss
from ..moe.saved_settings import settings_of, write_settings


class MoETrainer(Trainer):
    """``transformers.Trainer`` for a model converted by ``convert_to_moe``; the same arguments, plus
    ``per_expert_metrics`` (default True): log each expert's load as its own scalar
    (``moe/layer_{i}/tokens_per_expert/{e}``...), besides the per-layer values.

    The MoE settings (router loss weights, aux-loss-free balancing, ep_size) are the ones the model was converted
    with, read from the model. With ep_size > 1 pass ``TrainingArguments(deepspeed=...)`` and launch with
    ``deepspeed``; a one-process DeepSpeed run needs no launcher (the one-rank process group is made here, as
    ``python train.py`` makes it).
    """

    def __init__(self, model=None, args=None, *trainer_args, per_expert_metrics: bool = True, **trainer_kwargs):
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
        self.moe_layers: list[MoEFeedForward] = moe_layers_of(self.model)
        self.per_expert_metrics = per_expert_metrics
        # On the device until a logging step: balance loss summed over micro-batches, micro-batches, tokens.
        self.router_sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)
        self.interval = IntervalStats(self.moe_layers, self.args.device)
        self.add_callback(RouterStepEnd(self))

    # -- the loss ---------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss plus, in training, the router losses of the same forward. The Trainer divides the loss
        by the accumulation steps afterwards unless the LM loss already is the micro-batch's share of the step's
        tokens (``num_items_in_batch``); the router loss, a mean over this micro-batch, then gets that division
        here. Either way a step's loss is its LM loss plus the mean router loss of its micro-batches."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.model.training:
            balance = balance_loss(self.moe_layers)
            extra = router_loss(balance, self.moe_layers, self.moe_config)
            if not self.divides_loss_later(num_items_in_batch):
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra
            tokens = inputs["input_ids"].numel() if "input_ids" in inputs else 0
            self.router_sums += torch.stack([balance.detach().double(), self.router_sums.new_tensor(1.0),
                                             self.router_sums.new_tensor(float(tokens))])
        return (loss, outputs) if return_outputs else loss

    def divides_loss_later(self, num_items_in_batch) -> bool:
        """Whether ``Trainer.training_step`` divides what ``compute_loss`` returns by the accumulation steps (its own
        condition)."""
        return (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None

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
        metrics: ``aux_loss`` and ``moe/layer_{i}/...`` (docs/metrics.md), over all ranks."""
        if "loss" in logs:
            logs = {**logs, **self.moe_metrics()}
        super().log(logs, start_time)

    def moe_metrics(self) -> dict:
        """The interval's balance loss and routing counters, summed over ranks by one all-reduce; resets them."""
        summed = all_reduce_sum(torch.cat([self.router_sums, self.interval.vector()])).tolist()
        self.router_sums.zero_()
        balance_sum, micro_batches, tokens = summed[:3]
        row = {"aux_loss": balance_sum / micro_batches} if micro_batches else {}
        row.update(self.interval.metrics(summed[3:], tokens, self.args.world_size))
        return scalars(row, self.per_expert_metrics)

    # -- saving -----------------------------------------------------------------------------------------------

    def _save(self, output_dir=None, state_dict=None) -> None:
        """The Trainer's files, plus ``moe_config.json`` (export reads it: python -m moe_models.export)."""
        super()._save(output_dir, state_dict)
        write_settings(output_dir if output_dir is not None else self.args.output_dir, self.moe_config,
                       self.moe_layout)

    def save_model(self, output_dir=None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model``. At ep_size > 1 each rank holds only its experts, so the model file holds rank
        0's; a call of yours then also writes the DeepSpeed checkpoint (one file per expert), which export reads.
        Every rank must call it then (the Trainer's own checkpoints write it already)."""
        super().save_model(output_dir, _internal_call)
        if self.is_deepspeed_enabled and self.moe_config.ep_size > 1 and not _internal_call:
            self.model_wrapped.save_checkpoint(output_dir if output_dir is not None else self.args.output_dir)


class RouterStepEnd(TrainerCallback):
    """After each optimizer step, on every rank: the aux-loss-free biases move by the step's load (unless the step
    was skipped) and the per-step load counts restart (``moe.balance.end_of_step``)."""

    def __init__(self, trainer: MoETrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        end_of_step([layer.gate for layer in trainer.moe_layers], trainer.moe_config.router_bias_update_rate,
                    step_applied=not trainer.accelerator.optimizer_step_was_skipped)


def check_parallelism(moe: MoEConfig, args) -> None:
    """Refuse what cannot train the model correctly: experts split over ranks without DeepSpeed (a plain data-parallel
    wrapper would average each rank's different experts), and ZeRO stage 3."""
    deepspeed_config = getattr(args, "hf_deepspeed_config", None) if args is not None else None
    if moe.ep_size > 1 and deepspeed_config is None:
        raise ValueError(f"the model was converted with ep_size {moe.ep_size}: expert parallelism needs DeepSpeed. "
                         "Pass TrainingArguments(deepspeed=...) (a DeepSpeed JSON path or dict) and launch with "
                         f"`deepspeed --num_gpus N script.py`, N a multiple of {moe.ep_size}; or convert with "
                         "ep_size 1")
    if deepspeed_config is not None:
        if deepspeed_config.config.get("zero_optimization", {}).get("stage", 0) == 3:
            raise ValueError("ZeRO stage 3 does not work with DeepSpeed MoE layers (it partitions the expert weights "
                             "that expert parallelism already splits); use stage 2 in the DeepSpeed config")
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        if world_size % moe.ep_size:
            raise ValueError(f"ep_size {moe.ep_size} must divide the number of ranks ({world_size}): launch a multiple "
                             f"of {moe.ep_size} ranks, or convert with an ep_size that divides {world_size}")


def expert_param_groups(groups: list[dict]) -> list[dict]:
    """``groups`` with their expert parameters moved into groups of their own (one per expert-parallel size, keeping
    each group's settings); empty groups dropped."""
    named = [{**group, "name": group.get("name", f"group_{i}")} for i, group in enumerate(groups)]
    return [group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]]


def scalars(row: dict, per_expert: bool) -> dict:
    """A metrics row as the Trainer's loggers take it: numbers only. A per-expert list becomes one entry per expert,
    ``key/{e}`` (or is left out without ``per_expert``)."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, list):
            if per_expert:
                flat.update({f"{key}/{e}": item for e, item in enumerate(value)})
        else:
            flat[key] = value
    return flat
