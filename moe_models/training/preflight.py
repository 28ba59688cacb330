"""The preflight plan (`train.py --plan`): what a run will hold per rank, before it is launched.

The settings are validated as for a run, the model is built on the meta device (no weight is allocated) and its
parameters are counted (an HF MoE folder continued in place: its own class from its config, every expert swapped
in, hf/in_place_run.py's ``in_place_on_meta``); the rest is arithmetic on DeepSpeed's rules
(docs/performance.md#the-preflight-plan):

- weights: the dense (non-expert) parameters and this rank's num_experts / ep_size experts, in the training dtype;
- gradients: ZeRO 0 holds one per local parameter; ZeRO 1 and 2 keep this rank's partition of them (dense
  parameters partitioned over all ranks, expert ones over their expert-data-parallel group of world / ep_size);
- optimizer states: Adam's two fp32 moments, plus the fp32 master copy that ZeRO 1/2 (and bf16) keep, per
  partition; none on the device with optimizer offload;
- activations: an estimate of what the forward of one micro-batch keeps for the backward (below), with and
  without activation checkpointing.

The test checks weights, gradients and optimizer states against the tensors a live engine holds (ZeRO 0/1/2,
ep_size 1 and 2, 2 ranks; tests/training/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from deepspeed.moe.utils import is_moe_param
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..hf.in_place import fused_experts_of
from ..hf.in_place_run import in_place_on_meta, is_in_place_folder
from ..metrics.throughput import (active_parameters, attention_dims, expert_flops_per_token, expert_parameters,
                                  flops_per_token, routes_per_token)
from ..models.source import resolve_model_config
from ..moe.layer import moe_layers_of
from ..moe.parallel import parallel_problems
from ..moe.saved_settings import settings_of
from ..moe.surgery import convert_to_moe
from ..run.config import MoEConfig, RunConfig
from ..run.distributed import ranks_on_this_node
from ..run.moe_layout import expert_counts
from .clusters import resolve_cluster
from .ds_config import bf16_follows_the_device
from .node_once_bytes import node_once_bytes
from .step_time import all_to_all_split, predict
from .validate import checked_moe

GIB = 2**30
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of the model the settings build."""

    dense_parameters: int      # every parameter that is not a routed expert's (replicated on every rank)
    expert_parameters: int     # every routed expert's, all MoE layers, all global experts
    active_parameters: int     # those one token's forward multiplies by (experts counted top_k times)
    flops_per_token: float     # training FLOPs per token (6 N + attention, metrics/throughput.py)
    num_layers: int
    hidden_size: int
    vocab_size: int
    moe_layers: int            # MoE layers
    routes: int                # per token, its routes summed over MoE layers (top_k each)
    routed_units: int          # per token, the hidden units of the experts it goes through, summed over MoE layers
    always_on_units: int       # per token, the hidden units of dense FFNs (blocks left dense) and shared experts
    router_outputs: int        # per token, the router logits over all MoE layers
    flops_per_route: float = 0.0  # training FLOPs of one route: 6 x the parameters of one expert (MoE layers' mean)


def model_shape(cfg: RunConfig) -> ModelShape:
    """Build the model of ``cfg`` on the meta device (as at ep_size 1: every expert) and measure it."""
    if is_in_place_folder(cfg.model.model_name_or_path):
        return _in_place_shape(cfg)
    path = cfg.model.model_name_or_path
    config = AutoConfig.from_pretrained(path) if path else resolve_model_config(cfg.model)
    moe = dataclasses.replace(cfg.moe, ep_size=1)  # every expert; on the meta device nothing is drawn
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # init_empty_weights re-creates assigned parameters: tie once outside it
    with torch.device("meta"):
        model = convert_to_moe(model, moe, seed=0)
    layers, layout = moe_layers_of(model), settings_of(model)[1]
    dense_units = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    shared_units = layout.shared_copies * dense_units * len(layers)
    return _measured(model, layers, config, cfg.data.block_size,
                     routed_units=sum(layer.top_k for layer in layers) * layout.expert_width(dense_units),
                     always_on_units=(config.num_hidden_layers - len(layers)) * dense_units + shared_units)


def _in_place_shape(cfg: RunConfig) -> ModelShape:
    """An HF MoE folder continued in place, from its config alone: the family's class on the meta device with every
    expert swapped in and the family's top-k. Its always-on units are the hidden units of every ``down_proj``
    Linear outside the routed experts (dense blocks' FFNs, shared experts)."""
    model = in_place_on_meta(cfg.model.model_name_or_path, cfg.moe, cfg.given)
    layers = fused_experts_of(model)
    return _measured(model, layers, model.config.get_text_config(), cfg.data.block_size,
                     routed_units=sum(routes_per_token(layer) * _expert_width(layer) for layer in layers),
                     always_on_units=sum(module.in_features for name, module in model.named_modules()
                                         if name.endswith("down_proj") and isinstance(module, torch.nn.Linear)))


def _expert_width(layer) -> int:
    """F, the hidden units of one expert of an in-place layer (its down_proj [L, D, F], or [L, F, D] transposed)."""
    experts = layer.experts
    return experts.down_proj.shape[1 if experts.transposed else 2]


def _measured(model, layers: list, config: PretrainedConfig, block_size: int, routed_units: int,
              always_on_units: int) -> ModelShape:
    """The shape of ``model`` (on the meta device, every expert in it) with MoE ``layers``."""
    experts = sum(p.numel() for p in model.parameters() if is_moe_param(p))
    active = active_parameters(model, layers)
    return ModelShape(
        dense_parameters=sum(p.numel() for p in model.parameters()) - experts, expert_parameters=experts,
        active_parameters=active,
        flops_per_token=flops_per_token(active, *attention_dims(config), block_size),
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        moe_layers=len(layers), routes=sum(map(routes_per_token, layers)), routed_units=routed_units,
        always_on_units=always_on_units, router_outputs=sum(layer.num_experts for layer in layers),
        flops_per_route=expert_flops_per_token(sum(map(expert_parameters, layers)) / max(len(layers), 1), 1))


def adaptive_compute(moe: MoEConfig, shape: ModelShape) -> dict | None:
    """With --top_p or --num_null_experts a token runs at most top_k real experts per MoE layer: the planned FLOPs
    per token are an upper bound. With a compute target (--null_expert_target_real_k K_t) the prediction counts K_t
    real experts per MoE layer: flops_per_token - (top_k - K_t) x MoE layers x FLOPs per route. None for fixed
    top-k."""
    if not moe.num_null_experts and moe.top_p is None:
        return None
    target = moe.null_expert_target_real_k if moe.num_null_experts else None
    unspent = 0.0 if target is None else (moe.top_k - target) * shape.moe_layers * shape.flops_per_route
    return {"rule": "top-p" if moe.top_p is not None else "null experts", "max_real_experts_per_token": moe.top_k,
            "target_real_experts_per_token": target,
            "expert_flops_per_token_at_most": shape.routes * shape.flops_per_route,
            "predicted_flops_per_token": shape.flops_per_token - unspent}


def predicted_shape(result: dict) -> ModelShape:
    """The plan's model shape with the FLOPs per token the step-time prediction counts: the compute target's under
    adaptive compute (``adaptive_compute``), else the planned ones."""
    shape = ModelShape(**result["shape"])
    adaptive = result.get("adaptive_compute")
    return dataclasses.replace(shape, flops_per_token=adaptive["predicted_flops_per_token"]) if adaptive else shape


@dataclass(frozen=True)
class Setup:
    """What the memory of a rank depends on beside the model."""

    world_size: int
    ep_size: int
    zero_stage: int
    bf16: bool
    offload_optimizer: bool
    micro_batch: int
    block_size: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    dispatcher: str = "per_route"  # --dispatcher

    @classmethod
    def of(cls, cfg: RunConfig, ds_config: dict, world_size: int) -> Setup:
        zero = ds_config.get("zero_optimization", {})
        return cls(world_size=world_size, ep_size=cfg.moe.ep_size, zero_stage=zero.get("stage", 0),
                   bf16=bool(ds_config.get("bf16", {}).get("enabled", False)),
                   offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") == "cpu",
                   micro_batch=cfg.train.per_device_train_batch_size, block_size=cfg.data.block_size,
                   gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                   activation_checkpointing=cfg.train.gradient_checkpointing, dispatcher=cfg.moe.dispatcher)


def bytes_per_rank(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """weights, gradients, optimizer_states, activations, total: bytes one rank holds on its device."""
    width = 2 if setup.bf16 else 4
    local_experts = shape.expert_parameters / setup.ep_size
    local = shape.dense_parameters + local_experts
    if setup.zero_stage == 0:  # every local parameter's gradient and states on this rank
        gradients = local * (width + (4 if setup.bf16 else 0))  # bf16: DeepSpeed's BF16_Optimizer adds fp32 grads
        optimizer = local * 4 * (ADAM_MOMENTS + (1 if setup.bf16 else 0))  # bf16: an fp32 master copy
    else:  # ZeRO 1/2: this rank's partition (expert parameters over world / ep_size ranks)
        partition = shape.dense_parameters / setup.world_size + local_experts / (setup.world_size / setup.ep_size)
        gradients = partition * width
        optimizer = partition * 4 * (ADAM_MOMENTS + 1)  # the fp32 master partition and the two moments
    if setup.offload_optimizer:
        optimizer = 0.0
    activations = activation_bytes(shape, setup)
    memory = {"weights": local * width, "gradients": gradients, "optimizer_states": optimizer,
              "activations": activations}
    return {**memory, "total": sum(memory.values())}


def activation_bytes(shape: ModelShape, setup: Setup) -> float:
    """Estimated bytes one micro-batch's forward keeps for the backward; with activation checkpointing, what the
    checkpoints keep plus one block's activations while it is recomputed.

    Per token, in elements (checked against a count of the tensors autograd saves, docs/performance.md): per block
    9 h for attention and norms (scaled dot-product attention, no s^2 term), per route 4 F + 2 h for the expert
    FFN (F its hidden units), 4 F' for a dense FFN or shared experts of F' units, one per router logit (fp32), then
    4 h and the vocabulary's logits (fp32) at the end. Checkpointing keeps 2 h per block and 3 h + the logits at the end.
    """
    width = 2 if setup.bf16 else 4
    h, L = shape.hidden_size, shape.num_layers
    tokens = setup.micro_batch * setup.block_size
    blocks = 9 * h * L + 4 * shape.routed_units + 2 * h * shape.routes + 4 * shape.always_on_units
    head = 4 * h * width + shape.vocab_size * 4
    if not setup.activation_checkpointing:
        return tokens * (blocks * width + shape.router_outputs * 4 + head)
    one_block = blocks / L * width + shape.router_outputs / max(shape.moe_layers, 1) * 4
    return checkpoint_kept_bytes(shape, setup) + tokens * one_block


def checkpoint_kept_bytes(shape: ModelShape, setup: Setup) -> float:
    """With activation checkpointing, what the forward keeps for the backward: 2 h per block (its input) and 3 h
    and the logits (fp32) at the end, per token."""
    width = 2 if setup.bf16 else 4
    h = shape.hidden_size
    return setup.micro_batch * setup.block_size * ((2 * shape.num_layers + 3) * h * width + shape.vocab_size * 4)


def all_to_all_bytes_per_step(shape: ModelShape, setup: Setup) -> float:
    """Bytes one rank sends in the expert-parallel all-to-alls of one optimizer step, with routes spread evenly over
    the experts: each route's hidden state goes out and its output comes back, in the forward and again (as
    gradients) in the backward, (ep_size - 1) / ep_size of them to other ranks; a checkpointed recompute sends the
    forward's again."""
    if setup.ep_size == 1:
        return 0.0
    width = 2 if setup.bf16 else 4
    routes = setup.micro_batch * setup.block_size * shape.routes
    passes = 2 + (1 if setup.activation_checkpointing else 0)  # forward, backward (, recompute)
    return (routes * shape.hidden_size * width * 2 * passes * (setup.ep_size - 1) / setup.ep_size
            * setup.gradient_accumulation_steps)


def all_to_all_bytes_by_node(cfg: RunConfig, shape: ModelShape, setup: Setup,
                             devices_per_node: int) -> tuple[float, float]:
    """(in node, across nodes) bytes one rank's dispatcher sends per step: per_route's bytes over its peers
    (step_time.all_to_all_split), node_once's by training/node_once_bytes.py."""
    if setup.dispatcher == "node_once":  # the flags' experts and routing (an MoE in place takes no --dispatcher)
        return node_once_bytes(cfg.moe, shape.moe_layers, shape.routes // max(shape.moe_layers, 1),
                               shape.hidden_size, setup, devices_per_node)
    return all_to_all_split(all_to_all_bytes_per_step(shape, setup), setup.ep_size, devices_per_node)


def plan(cfg: RunConfig, ds_config: dict, world_size: int, devices_per_node: int | None = None) -> dict:
    """The plan of a run: the model's shape, each rank's bytes, the all-to-all traffic and FLOPs (plan.json).
    ``devices_per_node`` (default: the launcher's ranks per node, else one node) matters to --dispatcher node_once."""
    shape = model_shape(cfg)
    setup = Setup.of(cfg, ds_config, world_size)
    memory = bytes_per_rank(shape, setup)
    all_to_all = all_to_all_bytes_per_step(shape, setup)
    if setup.dispatcher == "node_once":
        all_to_all = sum(all_to_all_bytes_by_node(cfg, shape, setup, devices_per_node
                                                  or ranks_on_this_node(default=world_size)))
    return {
        "setup": dataclasses.asdict(setup),
        "parameters": {"dense": shape.dense_parameters, "experts": shape.expert_parameters,
                       "total": shape.dense_parameters + shape.expert_parameters,
                       "local": shape.dense_parameters + shape.expert_parameters // setup.ep_size,
                       "active": shape.active_parameters},
        "bytes_per_rank": memory,
        "activations_other_way": activation_bytes(shape, dataclasses.replace(
            setup, activation_checkpointing=not setup.activation_checkpointing)),
        "all_to_all_bytes_per_step": all_to_all,
        "flops_per_token": shape.flops_per_token,
        "shape": dataclasses.asdict(shape),
        **({"adaptive_compute": adaptive} if (adaptive := adaptive_compute(cfg.moe, shape)) else {}),
    }


# The changes a plan that does not fit may suggest, smallest first: (description, the changed Setup)
def _changes(setup: Setup, num_experts: int) -> list[tuple[str, Setup]]:
    changes = []
    if not setup.activation_checkpointing:
        changes.append(("--gradient_checkpointing", dataclasses.replace(setup, activation_checkpointing=True)))
    if setup.zero_stage < 2:
        changes.append(("--deepspeed zero2", dataclasses.replace(setup, zero_stage=2)))
    ep = setup.ep_size * 2
    if not parallel_problems(MoEConfig(num_experts=num_experts, ep_size=ep), setup.world_size):
        changes.append((f"--ep_size {ep}", dataclasses.replace(setup, ep_size=ep)))
    batch = setup.micro_batch // 2
    while batch >= 1:
        changes.append((f"--per_device_train_batch_size {batch} (and --gradient_accumulation_steps "
                        f"{setup.gradient_accumulation_steps * setup.micro_batch // batch} for the same batch)",
                        dataclasses.replace(setup, micro_batch=batch,
                                            gradient_accumulation_steps=setup.gradient_accumulation_steps
                                            * setup.micro_batch // batch)))
        batch //= 2
    if not setup.offload_optimizer:
        changes.append(("--deepspeed zero2_offload (optimizer states in CPU memory)",
                        dataclasses.replace(setup, zero_stage=max(setup.zero_stage, 2), offload_optimizer=True)))
    return changes


def smallest_fitting_change(shape: ModelShape, setup: Setup, num_experts: int, device_gib: float) -> str | None:
    """The first change (in the order of ``_changes``) after which a rank fits ``device_gib``; then pairs of them;
    None when nothing listed fits."""
    single = _changes(setup, num_experts)
    for description, changed in single:
        if bytes_per_rank(shape, changed)["total"] <= device_gib * GIB:
            return description
    for first, changed in single:
        for second, twice in _changes(changed, num_experts):
            if second != first and bytes_per_rank(shape, twice)["total"] <= device_gib * GIB:
                return f"{first} and {second}"
    return None


def plan_with_fit(cfg: RunConfig, ds_config: dict, world_size: int) -> dict:
    """The plan (``plan``) and, with --device_memory_gb, whether a rank fits and, if not, the smallest change that
    does: what `train.py --plan` prints and writes to plan.json."""
    cluster = resolve_cluster(cfg.train.plan_cluster) if cfg.train.plan_cluster else None
    if cluster is not None and bf16_follows_the_device(cfg.train.deepspeed):  # the cluster's devices, not this one
        ds_config = {**ds_config, "bf16": {**ds_config.get("bf16", {}), "enabled": cluster.bf16}}
    result = plan(cfg, ds_config, world_size, cluster.devices_per_node if cluster else None)
    device_gib = cfg.train.device_memory_gb if cfg.train.device_memory_gb is not None or cluster is None \
        else cluster.memory_gib
    if cluster is not None:
        in_node, across = all_to_all_bytes_by_node(cfg, ModelShape(**result["shape"]), Setup(**result["setup"]),
                                                    cluster.devices_per_node)
        step = predict(predicted_shape(result), Setup(**result["setup"]), ds_config, cluster,
                       result["all_to_all_bytes_per_step"], split=(in_node, across))
        result.update(cluster=dataclasses.asdict(cluster), step_time=step.as_dict() if step else None,
                      all_to_all_bytes_in_node=in_node, all_to_all_bytes_across_nodes=across)
    fits = None if device_gib is None else result["bytes_per_rank"]["total"] <= device_gib * GIB
    experts = math.gcd(*expert_counts(checked_moe(cfg)))  # an MoE folder's own experts, not --num_experts'
    advice = (smallest_fitting_change(ModelShape(**result["shape"]), Setup(**result["setup"]), experts, device_gib)
              if fits is False else None)
    result.update(device_memory_gb=device_gib, fits=fits, smallest_fitting_change=advice,
                  precision_note=None if cluster else precision_note(cfg, result["setup"]["bf16"]))
    return result


def precision_note(cfg: RunConfig, bf16: bool) -> str | None:
    """Why a plan counts fp32 when the run it plans may train in bf16: ``"bf16": "auto"`` follows the machine that
    makes the plan, and this one has no GPU with bf16."""
    if bf16 or not bf16_follows_the_device(cfg.train.deepspeed):
        return None
    return ("fp32, because the DeepSpeed JSON's \"bf16\": {\"enabled\": \"auto\"} follows the machine making the "
            "plan, which has no GPU with bf16; a GPU run of it trains in bf16: to plan that, pass a copy of the JSON "
            "with \"bf16\": {\"enabled\": true} (--deepspeed my_zero.json)")
