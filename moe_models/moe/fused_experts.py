"""An HF MoE family's own fused experts module, as experts DeepSpeed manages: the replacement that keeps a model's
class and swaps only each sparse block's ``experts`` (hf/in_place.py does the swap).

Most HF MoE classes hold their experts as one module with fused 3D parameters, ``gate_up_proj`` [E, 2F, D] (or
``up_proj`` without a gate) and ``down_proj`` [E, D, F] (transposed in some families, with per-expert biases in
others), whose forward takes ``(hidden_states, top_k_index, top_k_weights)`` from the block's router.
``FusedExperts`` takes that module's place with the same forward:

1. dispatch: the routes sorted by expert and their tokens gathered (at ep_size > 1 also sent by all-to-all to the
   ranks holding their experts: moe/dispatcher.py);
2. experts: this rank's E / ep_size experts on their rows as grouped GEMMs, with the family's own expert function
   (``_apply_gate`` of its class, e.g. GPT-OSS's clamped SwiGLU on interleaved gate/up columns, or its ``act_fn``;
   its biases, its transposed layout);
3. combine: rows back in token order, each token's k outputs summed with the router's weights in fp32.

It is a ``deepspeed.moe.layer.MoE`` (made without building DeepSpeed's gate and expert copies), so the engine finds
it: its parameters carry the expert flags (``allreduce=False``, the expert group's name), get their own optimizer
groups, are reduced over the expert-data-parallel group, and are saved one file per global expert
(``layer_L_expert_E_...``) under DeepSpeed's names, ``deepspeed_moe.experts.deepspeed_experts.{i}.{name}``, each a
slice of the family's parameter ``name`` (``gate_up_proj``: [2F, D]). Shape letters: moe/__init__.py.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from .balance import CorrectionBias, StepLoad
from .counters import RoutingCounters
from .dispatcher import dispatcher_for, weighted_sum
from .experts import _per_expert_state, _stacked_state
from .padding import RealTokens
from .parallel import group_name
from .routes import Routes, recomputing, routes_per_expert

# The fused parameters an experts module may hold, in the order the forward uses them.
FUSED_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
FUSED_BIASES = ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


def router_logits_positions(outputs: tuple, classes: int) -> list[int]:
    """Where a family router's ``outputs`` hold its logits over its ``classes``: the floating-point tensors [..., classes]
    (its top-k ids and weights are [..., K]). The one home of this rule: the routing metrics read the logits by it
    (FusedExperts) and the balance loss's recorder (hf/in_place_balance.py). One family's router returns two such
    tensors, Llama 4's (scores, logits): moe/expert_major_experts.py takes the last."""
    return [i for i, out in enumerate(outputs) if isinstance(out, torch.Tensor) and out.dim() >= 2
            and out.shape[-1] == classes and out.is_floating_point()]


def fused_parameters(experts: nn.Module, names: Optional[dict[str, str]] = None) -> dict[str, nn.Parameter]:
    """The fused parameters of ``experts`` by their fused names (``gate_up_proj``, ``down_proj``, ...): its own
    parameters, or, with ``names``, those each fused name maps to (a family holding them under its own names: Aria's
    ``fc1.weight``, moe/self_routing_experts.py); a name it lacks is left out."""
    if names is None:
        return dict(experts.named_parameters(recurse=False))
    held = dict(experts.named_parameters())
    return {fused: held[name] for fused, name in names.items() if name in held}


def fused_experts_problem(experts: nn.Module, hidden_size: int, idle_gate_up_rows: int = 0,
                          names: Optional[dict[str, str]] = None) -> Optional[str]:
    """Why ``experts`` does not hold fused experts' parameters as ``LocalFusedExperts`` takes them (None when it
    does); its forward is each swap's own question (``FusedExperts.problem``). ``gate_up_proj`` may hold
    ``idle_gate_up_rows`` rows past the experts' (rows its class allocates and never uses: LongCat-Flash's, one per
    identity expert, moe/identity_experts.py); ``names``: as in ``fused_parameters``."""
    params = fused_parameters(experts, names)
    if "down_proj" not in params or not ({"gate_up_proj", "up_proj"} & params.keys()):
        wanted = (f"{', '.join(names.values())} (the fused experts' parameters of its class)" if names
                  else "fused gate_up_proj (or up_proj) and down_proj parameters")
        return (f"{type(experts).__name__} holds no {wanted} "
                f"(it holds {', '.join(n for n, _ in experts.named_parameters()) or 'none'})")
    extra = [n for n in params if n not in FUSED_WEIGHTS + FUSED_BIASES]
    if extra:
        return f"{type(experts).__name__} holds parameters other than the fused experts' ({', '.join(extra)})"
    num = params["down_proj"].shape[0]
    if any(p.dim() < 2 or p.shape[0] != num + (idle_gate_up_rows if n == "gate_up_proj" else 0)
           for n, p in params.items()):
        shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in params.items())
        return f"{type(experts).__name__}'s parameters do not all lead with one expert count ({shapes})"
    own = set(names.values()) if names else params.keys()
    inner = [n for n, _ in experts.named_parameters() if n not in own] + [n for n, _ in experts.named_buffers()]
    if inner:
        return (f"{type(experts).__name__} holds parameters or buffers in its submodules ({', '.join(inner)}), "
                "which the grouped experts would not train or move")
    if params["down_proj"].shape[1:] not in ((hidden_size, _width(experts, params)), (_width(experts, params),
                                                                                      hidden_size)):
        return f"{type(experts).__name__}'s down_proj {tuple(params['down_proj'].shape)} is not [E, D, F] or [E, F, D]"
    return None


def forward_arguments(experts: nn.Module) -> list[str]:
    """The positional arguments of ``experts``' forward, ``self`` aside (``hidden_states, top_k_index,
    top_k_weights`` where the block routes its tokens to the experts)."""
    arguments = [a for a in inspect.signature(type(experts).forward).parameters.values()
                 if a.kind in (a.POSITIONAL_ONLY, a.POSITIONAL_OR_KEYWORD)]
    return [a.name for a in arguments[1:]]


def _width(experts: nn.Module, params: dict) -> int:
    down = params["down_proj"]
    return down.shape[2] if _transposed(experts, params) is False else down.shape[1]


def _transposed(experts: nn.Module, params: dict) -> bool:
    """Whether weights are [E, in, out] (``x @ w``) rather than nn.Linear's [E, out, in]: transformers' decorator
    says so (``is_transposed``); otherwise the up projection's layout tells, when its sizes differ."""
    flag = getattr(experts, "is_transposed", None)
    if flag is not None:
        return bool(flag)
    up = params.get("gate_up_proj", params.get("up_proj"))
    down = params["down_proj"]
    return up.shape[1] == down.shape[2] and up.shape[2] != down.shape[2]


class FusedExperts(MoE):
    """This rank's share of an HF sparse block's fused experts (``family_experts``, whose parameters it takes: the
    experts ``ep_rank * L`` to ``(ep_rank + 1) * L - 1``, L = E / ep_size), with that module's forward signature.

    ``routing`` sums every training forward's routes (per-layer metrics, moe/counters.py); the router logits come
    from ``router`` (the block's router module) when given, by a forward hook that keeps its output of E columns (of
    E + 1 where the router also scores a skip class: Zaya's, whose block hands a route to it to the experts as expert
    0 with weight 0, so it runs and counts as expert 0's, as in the stock class).
    ``last_topk_ids_TK`` keeps the last forward's routes (global ids, -1 for a route to no computing expert).
    ``correction_bias``, when set (hf/in_place_bias.py), is the family's aux-loss-free bias that moves after each
    optimizer step by the step's routes per expert, which ``step_load`` counts (moe/balance.py). ``real_tokens``,
    when set (the batch has padding: ``MoELayers.ignore_padding``), keeps the padding's routes out of all of these.
    """

    def __init__(self, family_experts: nn.Module, hidden_size: int, ep_size: int = 1, ep_rank: int = 0,
                 router: Optional[nn.Module] = None):
        nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's gate and E expert copies
        problem = self.problem(family_experts, hidden_size, router)
        if problem:
            raise ValueError(problem)
        num_experts = self.family_expert_count(family_experts)
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size}): pick an ep_size "
                             f"that divides {num_experts}")
        self.ep_size, self.expert_group_name = ep_size, group_name(ep_size)
        self.num_experts, self.num_local_experts = num_experts, num_experts // ep_size
        self.use_residual, self.enable_expert_tensor_parallelism = False, False
        self.first_expert = ep_rank * self.num_local_experts
        local = LocalFusedExperts(family_experts, range(self.first_expert, self.first_expert + self.num_local_experts),
                                  self.expert_group_name, self.family_names(family_experts),
                                  self.activation(family_experts))
        self.deepspeed_moe = FusedExpertsLayer(local, dispatcher_for(self.num_local_experts, ep_size, True))
        if ep_size > 1 and self.expert_group_name in groups._get_expert_parallel_group_dict():
            # the dispatcher's group now, where it exists (the engine sets it again): the model runs before it
            self.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.expert_group_name))
        self.routing = RoutingCounters(num_experts)
        self.last_topk_ids_TK: Optional[torch.Tensor] = None
        self.correction_bias: Optional[CorrectionBias] = None
        self.step_load = StepLoad()
        self.real_tokens: Optional[RealTokens] = None  # the batch's real tokens (MoELayers.ignore_padding)
        self._router_logits: Optional[torch.Tensor] = None
        # the router's classes: its experts, and a skip class where it has one (Zaya's ``num_router_classes``)
        self.router_classes = getattr(router, "num_router_classes", num_experts)
        if router is not None:
            router.register_forward_hook(self._keep_router_logits)

    @classmethod
    def problem(cls, family_experts: nn.Module, hidden_size: int, router: Optional[nn.Module]) -> Optional[str]:
        """Why this class cannot take the place of ``family_experts`` (None when it can): fused parameters, and a
        forward that takes the router's top-k indices and weights."""
        problem = fused_experts_problem(family_experts, hidden_size)
        arguments = forward_arguments(family_experts)
        if problem is None and len(arguments) < 3:  # hidden_states, top_k_index, top_k_weights
            return (f"{type(family_experts).__name__}.forward takes ({', '.join(arguments)}), not the router's "
                    "top-k indices and weights: its block runs the experts its own way")
        return problem

    @classmethod
    def family_names(cls, family_experts: nn.Module) -> Optional[dict[str, str]]:
        """Each fused parameter's name in the family's module; None: the same names (``fused_parameters``)."""
        return None

    @classmethod
    def activation(cls, family_experts: nn.Module) -> Optional[nn.Module]:
        """The experts' activation where the family's module holds none as ``act_fn`` (None: its ``act_fn``)."""
        return None

    @classmethod
    def family_parameter_names(cls, family_experts: nn.Module) -> list[str]:
        """The family module's names of its fused parameters (``gate_up_proj``, ...; Aria's ``fc1.weight``, ...)."""
        names = cls.family_names(family_experts)
        return [names[fused] if names else fused for fused in fused_parameters(family_experts, names)]

    @classmethod
    def family_expert_count(cls, family_experts: nn.Module) -> int:
        """The experts of the family's module (its down projection's leading dimension)."""
        return fused_parameters(family_experts, cls.family_names(family_experts))["down_proj"].shape[0]

    def _keep_router_logits(self, module, args, output) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        found = router_logits_positions(outputs, self.router_classes)
        self._router_logits = outputs[found[0]] if found else None

    @property
    def experts(self) -> LocalFusedExperts:
        return self.deepspeed_moe.experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The family's experts' output for tokens ``hidden_states`` [T, D] routed to ``top_k_index`` [T, K] with
        ``top_k_weights`` [T, K]. Ids outside 0..E-1 (a family's zero-computation experts, a sentinel) compute
        nothing here (``_routes``; LongCat-Flash's identity experts: moe/identity_experts.py). With ``real_tokens``
        set (the batch has padding), only the real tokens' routes are run and counted: a padding token's output is 0
        and its ``last_topk_ids_TK`` -1 (moe/padding.py)."""
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        ids_TK = top_k_index.reshape(x_TD.shape[0], -1)
        weights_TK = top_k_weights.reshape(ids_TK.shape).float()
        logits_TE, self._router_logits = self._router_logits, None
        logits_TE = logits_TE.reshape(-1, self.router_classes).float() if logits_TE is not None else None
        if self.real_tokens is None:
            out_TD = self._run_routes(x_TD, ids_TK, weights_TK, logits_TE)
        else:
            out_TD = self._run_real_routes(x_TD, ids_TK, weights_TK, logits_TE)
        return out_TD.to(hidden_states.dtype).reshape(hidden_states.shape)

    @torch.compiler.disable  # the real tokens' count changes with every batch: no graph per count (--compile)
    def _run_real_routes(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                         logits_TE: Optional[torch.Tensor]) -> torch.Tensor:
        """``_run_routes`` of the real tokens alone (the family's router saw them all), put back in place."""
        real = self.real_tokens
        out_ND = self._run_routes(real.take(x_TD), real.take(ids_TK), real.take(weights_TK),
                                  real.take(logits_TE) if logits_TE is not None else None)
        self.last_topk_ids_TK = real.put(self.last_topk_ids_TK, fill=-1)
        return real.put(out_ND)

    def _run_routes(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                    logits_TE: Optional[torch.Tensor]) -> torch.Tensor:
        """dispatch -> experts -> combine of these routes (plus, where ``_routes`` gives the tokens a weight of
        their own input, that share of it: identity experts), counted (a training forward) in the routing counters
        and the step's load (routes per expert, then per null expert where there are some)."""
        routes = self._routes(ids_TK, weights_TK, logits_TE)
        out_TD = self.deepspeed_moe(x_TD, routes)
        if routes.null_weight_T is not None:  # identity experts: the token's input, weighted, on its own rank
            out_TD = out_TD + routes.null_weight_T.unsqueeze(1) * x_TD.to(out_TD.dtype)
        self.last_topk_ids_TK = routes.topk_ids_TK
        if self.training and self.correction_bias is not None and not recomputing():
            self.step_load.add_local(routes.chosen_E if routes.chosen_null is None
                                     else torch.cat([routes.chosen_E, routes.chosen_null]))
        if self.training and self.routing.enabled and routes.logits_TE is not None and not recomputing():
            self.routing.add(routes)
        return out_TD

    def _routes(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor, logits_TE: Optional[torch.Tensor]) -> Routes:
        """The family's routes as this layer runs them: ids outside 0..E-1 (a family's zero-computation experts, a
        sentinel) marked -1 with weight 0, computing nothing."""
        ids_TK = torch.where((ids_TK >= 0) & (ids_TK < self.num_experts), ids_TK, -1)
        weights_TK = torch.where(ids_TK >= 0, weights_TK, 0.0)
        counts_E = routes_per_expert(ids_TK, self.num_experts)
        return Routes(logits_TE, ids_TK, weights_TK, counts_E, counts_E, weights_TK.new_zeros(()))

    def global_expert_ids(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local_experts)


class FusedExpertsLayer(nn.Module):
    """DeepSpeed's ``MOELayer`` place in the tree (``deepspeed_moe``): the local experts and the dispatcher, which
    the engine gives the expert-parallel group (``_set_ep_group``)."""

    def __init__(self, experts: LocalFusedExperts, dispatcher):
        super().__init__()
        self.experts, self.dispatcher = experts, dispatcher
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group
        self.dispatcher.ep_group = ep_group

    def forward(self, x_TD: torch.Tensor, routes: Routes) -> torch.Tensor:
        """dispatch -> experts -> combine (the route was the family's router)."""
        x_ND, counts_L, sorted_ = self.dispatcher.dispatch(x_TD, routes)  # 1. dispatch
        y_ND = self.experts(x_ND, counts_L)                              # 2. experts
        y_TKD = self.dispatcher.combine(y_ND, sorted_)                   # 3. combine
        return weighted_sum(y_TKD, routes.weights_TK)


class LocalFusedExperts(nn.Module):
    """The local experts' slices of the family's fused parameters ([L, ...] each, same layout, under their fused
    names), run as grouped GEMMs over rows grouped by local expert, with the family's expert function (``act_fn``:
    the family's own, where not given). State dicts show one entry per (local expert, parameter),
    ``deepspeed_experts.{i}.{name}`` under the family's name of the parameter (``family_names``), and take them
    back."""

    def __init__(self, family_experts: nn.Module, expert_ids: range, expert_group_name: str,
                 family_names: Optional[dict[str, str]] = None, act_fn: Optional[nn.Module] = None):
        super().__init__()
        params = fused_parameters(family_experts, family_names)
        self.family_names = family_names or {name: name for name in params}
        self.num_experts = len(expert_ids)
        self.transposed = _transposed(family_experts, params)
        self.has_gate = "gate_up_proj" in params
        for name, param in params.items():
            with torch.no_grad():
                local = param[expert_ids.start:expert_ids.stop].clone() if len(expert_ids) < param.shape[0] else param
            setattr(self, name, nn.Parameter(local.data, requires_grad=param.requires_grad))
            mine = getattr(self, name)
            mine.allreduce, mine.group_name, mine.is_expert_group = False, expert_group_name, True
        for name in params:  # the family's module keeps its function, not its weights
            holder, _, attr = self.family_names[name].rpartition(".")
            delattr(family_experts.get_submodule(holder), attr)
        self.__dict__["function"] = family_experts  # not a submodule: no parameters, no state-dict entries
        self.__dict__["act_fn"] = act_fn if act_fn is not None else getattr(family_experts, "act_fn", None)
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stacked_state)

    def stacked_names(self) -> dict[str, str]:
        """Each stacked parameter's name -> its name in one expert's entries (the family's)."""
        return {name: self.family_names[name] for name, _ in self.named_parameters()}

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        offsets_L = torch.cumsum(counts_L, dim=0, dtype=torch.int32)
        # each row's local expert; rows past the last offset (none at ep_size > 1, dropped routes at 1) get L
        expert_N = torch.bucketize(torch.arange(x_ND.shape[0], device=x_ND.device), offsets_L, right=True)
        up = self._project("gate_up_proj" if self.has_gate else "up_proj", x_ND, offsets_L, expert_N)
        hidden = self._gated(up) if self.has_gate else self.act_fn(up)
        out_ND = self._project("down_proj", hidden, offsets_L, expert_N)
        return torch.where((expert_N < self.num_experts).unsqueeze(-1), out_ND, 0.0)

    def _gated(self, gate_up_NF2: torch.Tensor) -> torch.Tensor:
        apply_gate = getattr(type(self.function), "_apply_gate", None)
        if apply_gate is not None:  # the family's own (transformers' decorator gives the default one)
            return apply_gate(self.function, gate_up_NF2)
        gate, up = gate_up_NF2.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _project(self, name: str, x_NI: torch.Tensor, offsets_L: torch.Tensor, expert_N: torch.Tensor):
        weight = getattr(self, name).to(x_NI.dtype)
        weight_LIO = weight if self.transposed else weight.transpose(-2, -1)
        y_NO = torch._grouped_mm(x_NI.contiguous(), weight_LIO, offs=offsets_L)
        bias = getattr(self, f"{name}_bias", None)
        if bias is not None:
            bias = bias.to(x_NI.dtype)
            y_NO = y_NO + torch.cat([bias, bias.new_zeros(1, bias.shape[-1])])[expert_N]
        return y_NO
