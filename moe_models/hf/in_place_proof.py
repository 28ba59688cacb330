"""The proof every in-place continuation passes (hf/in_place.py), as moe/proof.py's for dense surgery: a probe model
of the family (models/probe.py's ``small_moe_config``: its config made small, 8 experts, fresh weights) has its
experts swapped at ep_size 1 and must keep the stock class's function.

- logits: equal to the stock model's (its experts run by the family's own eager code) to 1e-4 of the largest;
- backward: every parameter of the swapped experts and of every router gets a gradient, and every parameter's
  gradient equals the stock model's to 1e-4 of that tensor's largest, or of a thousandth of the model's largest
  gradient where that is larger (the experts' compared whole: at ep_size 1 the
  swapped module holds them all, under the family's parameter names); where the stock parameter holds rows past the
  swapped one's (LongCat-Flash's gate_up_proj, a row per identity expert, which no expert uses), those rows' stock
  gradient must be 0.

A family that fails is refused with one line: what was found and what to do. The result is kept per (class, config).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig

from ..models.probe import small_moe_config
from ..moe.fused_experts import FusedExperts
from .in_place import fused_experts_of, in_place_problem, sparse_blocks, swap_experts

PROBE_SHAPE = (2, 32)  # sequences, tokens: 128 routes at top-2, so every one of the 8 experts gets rows
TOLERANCE = 1e-4       # on logits and gradients, relative to their largest magnitude (fp32)
GRADIENT_FLOOR = 1e-3  # a gradient's scale is at least this share of the model's largest (a router whose top-1
#                        weight is always 1 gets a gradient of rounding noise, ~1e-9)
WHAT_TO_DO = "start from a dense model of the family instead (docs/models.md)"

_PROVEN: dict[tuple[str, str], str | None] = {}  # (class, config JSON) -> None, or why the proof failed


def prove_in_place(model_class: type, config: PretrainedConfig) -> None:
    """Raise a ValueError (one line: what was found, what to do) when swapping the experts of a probe model of
    ``model_class`` (built from ``config`` made small) changes its logits or its gradients."""
    key = (model_class.__qualname__, config.to_json_string(use_diff=False))
    if key not in _PROVEN:
        _PROVEN[key] = _disproof(model_class, config)
    if _PROVEN[key] is not None:
        raise ValueError(_PROVEN[key])


def probe_model(model_class: type, config: PretrainedConfig, seed: int = 0) -> nn.Module:
    """The family's probe: ``model_class`` of ``config`` made small (of its text part where the class takes that of
    a composite config: Llama 4's causal LM of a multimodal folder), fresh fp32 weights drawn from ``seed``, eval
    mode (no dropout), its experts run by the family's own eager code where transformers lets that be chosen."""
    if not isinstance(config, model_class.config_class):
        config = config.get_text_config()
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = model_class(small_moe_config(config)).float().eval()
    if model._can_set_experts_implementation():
        model.set_experts_implementation("eager")
    return model


def _disproof(model_class: type, config: PretrainedConfig) -> str | None:
    model_type = getattr(config, "model_type", "?")
    try:
        stock = probe_model(model_class, config)
    except Exception as err:  # noqa: BLE001 - a family transformers cannot build small: say so, whatever it is
        return _refusal(model_type, f"its probe model (its config made small) cannot be built ({_text(err)})")
    problem = in_place_problem(stock)
    if problem:
        return f"{problem}; {WHAT_TO_DO}"
    ids = torch.randint(0, min(stock.get_input_embeddings().num_embeddings, 256), PROBE_SHAPE,
                        generator=torch.Generator().manual_seed(0))
    try:
        expected = _logits_and_backward(stock, ids)
    except Exception as err:  # noqa: BLE001
        return _refusal(model_type, f"its probe model (its config made small) does not run ({_text(err)})")
    swapped = copy.deepcopy(stock)
    for param in swapped.parameters():
        param.grad = None
    try:
        swap_experts(swapped)
        got = _logits_and_backward(swapped, ids)
    except Exception as err:  # noqa: BLE001 - any failure of the swapped model is the refusal's reason
        return _refusal(model_type, f"its probe model with swapped experts fails ({_text(err)})")
    difference = _relative(got, expected)
    if not difference <= TOLERANCE:
        return _refusal(model_type, f"with swapped experts its probe model's logits change (largest difference "
                        f"{difference:.2e} of the largest logit, at most {TOLERANCE:g} allowed)")
    return _gradient_problem(stock, swapped, model_type)


@torch.enable_grad()  # the proof may be asked for under no_grad (a plan, an evaluation): it needs the backward
def _logits_and_backward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits.float()
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach()


def _gradient_problem(stock: nn.Module, swapped: nn.Module, model_type: str) -> str | None:
    """Every expert and router parameter reached, and every gradient the stock model's."""
    routers = {id(p) for block in sparse_blocks(swapped) if block.router is not None
               for p in block.router.parameters() if p.requires_grad}
    experts = {id(p) for module in fused_experts_of(swapped) for p in module.parameters()}
    unreached = [name for name, p in swapped.named_parameters() if id(p) in routers | experts and p.grad is None]
    if unreached:
        return _refusal(model_type, f"with swapped experts the backward pass does not reach {unreached[0]}")
    stock_params = dict(stock.named_parameters())
    stock_names = _stock_names(swapped)
    floor = GRADIENT_FLOOR * max(p.grad.abs().max().item() for p in stock_params.values()
                                 if p.grad is not None and p.numel())  # a module of no units has empty ones
    for name, param in swapped.named_parameters():
        stock_name = stock_names.get(name, name)
        reference = stock_params[stock_name].grad
        if (param.grad is None) != (reference is None):
            return _refusal(model_type, f"with swapped experts {stock_name} gets a gradient where the stock model "
                            f"{'does not' if reference is None else 'does'}")
        if reference is not None and reference.dim() and reference.shape[0] > param.shape[0]:
            idle = reference[param.shape[0]:]  # rows no expert uses (LongCat-Flash's identity experts' gate_up_proj)
            if idle.any():
                return _refusal(model_type, f"{stock_name}'s rows past the swapped experts' get a gradient in the "
                                "stock model")
            reference = reference[:param.shape[0]]
        difference = _relative(param.grad, reference, floor) if reference is not None else 0.0
        if not difference <= TOLERANCE:
            return _refusal(model_type, f"with swapped experts the gradient of {stock_name} differs from the stock "
                            f"model's by {difference:.2e} of its largest")
    return None


def _stock_names(swapped: nn.Module) -> dict[str, str]:
    """The swapped experts' parameter names as the stock model spells them: ``...experts.deepspeed_moe.experts.X``
    is ``...experts.X``, or X's name in the family's module (Aria's ``fc1.weight``)."""
    names = {}
    for path, module in swapped.named_modules():
        if isinstance(module, FusedExperts):
            for fused, family in module.experts.stacked_names().items():
                names[f"{path}.deepspeed_moe.experts.{fused}"] = f"{path}.{family}"
    return names


def _relative(got: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    if not expected.numel():
        return 0.0
    scale = max(expected.abs().max().item(), floor) or 1.0
    return (got.float() - expected.float()).abs().max().item() / scale


def _refusal(model_type: str, found: str) -> str:
    return f"model type {model_type!r} cannot be continued in place: {found}; {WHAT_TO_DO}"


def _text(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
