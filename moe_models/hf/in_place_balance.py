"""The family's own balance loss in place: transformers adds ``router_aux_loss_coef`` x its balance loss to the LM
loss when ``output_router_logits`` is on, from the router logits its output recorder collects.

Some classes of transformers 5.17 read ``output_router_logits`` in their forward but register no recorder of router
logits (GraniteMoe, GraniteMoeShared, GraniteMoe-SWA, GraniteMoeHybrid, Qwen4-Exp): with the flag on, their forward fails on
the loss (``'int' object has no attribute 'to'``), stock or ours. For such a class the recorder transformers gives the
others is declared here, on the class, for the process: the block's router class, at the index of its output that
holds the logits, [T, E]. It is written here because transformers has no other way to add it; it changes nothing
while ``output_router_logits`` is off, and makes the stock class's loss work as its code intends when it is on.

Llama 4's class has none: its config carries ``output_router_logits`` and ``router_aux_loss_coef``, but
``Llama4ForCausalLM`` returns a ``CausalLMOutputWithPast`` (no ``aux_loss``) and its loss is the LM loss alone,
with the flag on or off. Such a class is left as it is (``has_balance_loss``): its run trains on the LM loss.
"""

from __future__ import annotations

import inspect
import typing

import torch
from torch import nn
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder

from ..moe.fused_experts import router_logits_positions
from .in_place import sparse_blocks

ROUTER_LOGITS = "router_logits"


def use_family_balance_loss(model: nn.Module) -> None:
    """Turn the family's balance loss on (where its config has ``output_router_logits``), registering the router
    logits' recorder its class lacks."""
    if not has_balance_loss(model):
        return
    model.config.output_router_logits = True
    for module in model.modules():  # the classes whose forward records the decoder's outputs
        flags = _CAN_RECORD_REGISTRY.get(str(type(module)))
        if flags is not None and "hidden_states" in flags and ROUTER_LOGITS not in flags:
            router = sparse_blocks(model)[0].router
            flags = {**flags, ROUTER_LOGITS: OutputRecorder(type(router), index=logits_index(router))}
            # on the class, as transformers declares it, since each new instance registers its class's anew
            type(module)._can_record_outputs = _CAN_RECORD_REGISTRY[str(type(module))] = flags


def has_balance_loss(model: nn.Module) -> bool:
    """Whether the family's class adds a balance loss: its config has ``output_router_logits`` and its forward returns
    an output with an ``aux_loss`` (transformers' MoE outputs; where the annotation cannot be read, it is taken to)."""
    if not hasattr(model.config, "output_router_logits"):
        return False
    try:
        returned = inspect.signature(type(model).forward, eval_str=True).return_annotation
    except (NameError, TypeError, ValueError):
        return True
    outputs = [c for c in typing.get_args(returned) or (returned,)
               if isinstance(c, type) and issubclass(c, ModelOutput)]
    return not outputs or any("aux_loss" in getattr(c, "__dataclass_fields__", {}) for c in outputs)


@torch.no_grad()
def logits_index(router: nn.Module) -> int:
    """Where the router's output holds its logits: the element [T, E] (E its experts) that is no top-k."""
    weight = next(p for p in router.parameters() if p.dim() == 2)  # [E, D]
    num_experts, hidden = weight.shape
    outputs = router(torch.zeros(3, hidden, dtype=weight.dtype, device=weight.device))
    found = router_logits_positions(outputs if isinstance(outputs, tuple) else (outputs,), num_experts)
    if len(found) != 1:
        raise ValueError(f"{type(router).__name__} returns no single [tokens, {num_experts}] tensor of logits, so its "
                         "family's balance loss cannot be recorded")
    return found[0]
