"""A model's MoE layers as a trainer sees them: one contract that every trainer calls (the bookkeeping both trainers
share, training/bookkeeping.py, and MoETrainer's loss), so that both add the same losses, move the same biases and
log the same metrics.

    moe_layers = MoELayers(model)                           the MoEFeedForward layers, in model order (iterable)
    moe_layers.ignore_padding(batch["attention_mask"], dev) before each forward of a batch with padding
    loss, balance_loss = moe_layers.router_loss(lm_loss)    after each training forward: what the routers add
    ... backward, optimizer step ...
    moe_layers.after_optimizer_step(applied)                every rank, after each optimizer step (applied or skipped)
    sums = moe_layers.interval_sums(device)                 at a logging step: named on-device sums, which the trainer
    row = moe_layers.interval_metrics(sum_over_ranks(...))  sums over ranks with its own in one all-reduce; resets
    counts = moe_layers.domain_routes(n, device, names)     at eval: routes per (domain, expert) (moe/domain_routing.py)
    moe_layers.expert_similarity()                          at eval: how far the experts moved apart (every rank)

Each layer's settings are its own (the loss weights on the layer, the bias rate on its router), so a trainer passes
no MoEConfig. A model without MoE layers (a dense run) gives zero losses and no metrics. One quantity, one name: the
balance loss (``MoEFeedForward.balance_loss``, DeepSpeed's ``l_aux``) is weighted by ``aux_loss_coef`` (the flag's
and HF's name) and logged as ``aux_loss`` (the metrics key of every run so far).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..metrics.routing import mean_pairwise_cosine, routing_metrics, shared_expert_metrics
from ..metrics.throughput import expert_flops_per_token, expert_parameters, routes_per_token
from .balance import update_correction_biases, update_score_biases
from .counters import RoutingSums, from_named, named
from .dispatcher import AllToAllDispatcher
from .domain_routing import DomainRouteCounts
from .fused_experts import FusedExperts
from .layer import MoEFeedForward, moe_layers_of
from .padding import RealTokens
from .shared import SharedSums


def balance_loss(layers: list[MoEFeedForward]) -> torch.Tensor:
    """Sum of the load-balancing losses of the last forward over all MoE layers."""
    return torch.stack([layer.balance_loss for layer in layers]).sum()


class MoELayers:
    """The MoE layers of one model (in model order: ``moe/layer_{i}/...`` in the metrics), as a trainer sees them;
    iterating, indexing and ``len`` reach the layers themselves."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers_of(model)
        # A model continued in place (hf/in_place.py) routes by its family's own routers, whose balance loss is in its
        # LM loss: its FusedExperts add no router loss here, but their routes are counted and logged as ours are.
        self.in_place = [module for module in model.modules() if isinstance(module, FusedExperts)]
        self.counted = [*self.layers, *self.in_place]  # moe/layer_{i} in the metrics
        self.steps_in_interval = 0  # optimizer steps since the last interval_metrics (the same on every rank)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, index: int) -> MoEFeedForward:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    # -- the loss ----------------------------------------------------------------------------------------------

    def router_loss(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the routers add to the LM loss of the last forward, its summed balance loss, unweighted): each
        layer's ``aux_loss_coef`` x its balance loss and, when on, ``z_loss_coef`` x its z-loss and
        ``dynamic_loss_coef`` x its dynamic loss. Zeros shaped and placed as ``like`` for a model without MoE layers."""
        if not self.layers:
            zero = like.new_zeros(())
            return zero, zero
        loss = torch.stack([layer.aux_loss_coef * layer.balance_loss for layer in self.layers]).sum()
        other_losses = [layer.z_loss_coef * layer.z_loss for layer in self.layers if layer.z_loss is not None]
        other_losses += [layer.dynamic_loss_coef * layer.dynamic_loss for layer in self.layers
                         if layer.dynamic_loss is not None]
        if other_losses:
            loss = loss + torch.stack(other_losses).sum()
        return loss, balance_loss(self.layers)

    def ignore_padding(self, attention_mask_BS: torch.Tensor | None, device: torch.device) -> None:
        """Before each forward, training or eval: the batch's attention mask (1 real, 0 padding; None or all ones:
        no padding), so that every MoE layer routes, counts and balances its real tokens only (moe/padding.py); an
        in-place layer (FusedExperts), whose family's router sees every token, runs and counts the real tokens' routes
        only."""
        real = RealTokens.of(attention_mask_BS, device) if self.counted else None
        for layer in self.counted:
            layer.real_tokens = real

    # -- after the optimizer step ------------------------------------------------------------------------------

    def after_optimizer_step(self, applied: bool) -> None:
        """Every rank, after each optimizer step: the aux-loss-free biases move by the step's load when the step was
        applied (a skipped step changes no weight, so no bias either), and the next step's load counts start."""
        routers = [layer.router for layer in self.layers]
        if applied:
            update_score_biases(routers)
            update_correction_biases(self.in_place)
        for step_load in [router.step_load for router in routers] + [layer.step_load for layer in self.in_place]:
            step_load.reset()
        for layer in self.counted:
            layer.routing.end_step()
        self.steps_in_interval += 1

    # -- the logging interval ----------------------------------------------------------------------------------

    def interval_sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every layer's routing sums (and shared-expert sums where it has shared experts) since the last
        ``interval_metrics``, by name, on the device."""
        sums = {}
        for i, layer in enumerate(self.counted):
            sums.update(named(layer.routing.sums(device), f"moe/layer_{i}/routing/"))
            if getattr(layer, "shared_counters", None) is not None:
                sums.update(named(layer.shared_counters.sums(device), f"moe/layer_{i}/shared/"))
            dispatcher = getattr(_deepspeed_layer(layer), "dispatcher", None)
            if isinstance(dispatcher, AllToAllDispatcher):  # bytes counted on the host from the split sizes
                for where, sent in zip(("in_node", "across_nodes"), dispatcher.take_sent_bytes()):
                    sums[f"moe/layer_{i}/sent_bytes/{where}"] = torch.tensor(float(sent), dtype=torch.float64,
                                                                             device=device)
        return sums

    def interval_metrics(self, summed: dict[str, torch.Tensor]) -> dict:
        """The interval's ``moe/layer_{i}/...`` row entries (docs/metrics.md) from ``interval_sums`` summed over
        ranks; the counters restart."""
        row = {}
        for i, layer in enumerate(self.counted):
            routing = from_named(RoutingSums, summed, f"moe/layer_{i}/routing/")
            values = routing_metrics(routing, layer.num_experts, routes_per_token(layer))
            if getattr(layer, "shared_counters", None) is not None:
                shared = from_named(SharedSums, summed, f"moe/layer_{i}/shared/")
                values.update(shared_expert_metrics(shared, gated=layer.shared_expert_gate is not None))
                layer.shared_counters.reset()
            if "real_experts_per_token" in values:
                values["real_expert_flops_per_token"] = expert_flops_per_token(expert_parameters(layer),
                                                                               values["real_experts_per_token"])
            router = layer.router if isinstance(layer, MoEFeedForward) else None  # in place: the family's
            if router is not None and router.force_balanced:
                values["forced_balanced_routing"] = True  # a benchmark's routing, not a learned one
            if router is not None and router.score_bias is not None:  # aux-loss-free balancing: the same on every rank
                values["score_bias"] = layer.router.score_bias.tolist()
            if getattr(layer, "correction_bias", None) is not None:  # in place: the family's bias, as it moves
                values["score_bias"] = layer.correction_bias.tensor().reshape(-1).tolist()
            for where in ("in_node", "across_nodes"):
                name = f"moe/layer_{i}/sent_bytes/{where}"
                if name in summed and self.steps_in_interval:  # mean over ranks, per optimizer step
                    values[f"all_to_all_bytes_{where}"] = float(summed[name]) / world_size() / self.steps_in_interval
            row.update({f"moe/layer_{i}/{key}": value for key, value in values.items()})
            layer.routing.reset()
        self.steps_in_interval = 0
        return row

    def spent_flops_per_token(self, flops_per_token: float, row: dict) -> float | None:
        """``flops_per_token`` (top_k experts per MoE layer) less the expert FLOPs the tokens did not spend, by each
        layer's ``real_expert_flops_per_token`` of ``row`` (interval_metrics); None when no layer logged it."""
        unspent = [expert_flops_per_token(expert_parameters(layer), routes_per_token(layer)) - row[key]
                   for i, layer in enumerate(self.counted)
                   if (key := f"moe/layer_{i}/real_expert_flops_per_token") in row]
        return flops_per_token - sum(unspent) if unspent else None

    # -- evaluation --------------------------------------------------------------------------------------------

    def domain_routes(self, num_domains: int, device: torch.device,
                      domains: Sequence[str] | None = None) -> DomainRouteCounts:
        """Counters of every layer's routes per (domain, expert) over one evaluation's forwards; ``domains`` names
        the domains in the per-domain keys."""
        return DomainRouteCounts(self.counted, num_domains, device, domains)

    def expert_similarity(self) -> dict:
        """``moe/layer_{i}/expert_similarity``: the mean pairwise cosine of the experts' weights, per layer with 2+
        experts. Every rank must call it (with ep_size > 1 it all-reduces over the expert-parallel group)."""
        layers = [(i, layer) for i, layer in enumerate(self.layers) if layer.num_experts > 1]
        if not layers:
            return {}
        sums_sq = torch.stack([layer.expert_direction_sum_sq() for _, layer in layers]).tolist()  # one host read
        return {f"moe/layer_{i}/expert_similarity": mean_pairwise_cosine(sum_sq, layer.num_experts)
                for (i, layer), sum_sq in zip(layers, sums_sq)}


def _deepspeed_layer(layer) -> nn.Module:
    """The module holding a layer's dispatcher: DeepSpeed's MOELayer place in our layer or an in-place one."""
    return layer.moe.deepspeed_moe if isinstance(layer, MoEFeedForward) else layer.deepspeed_moe


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
