"""The MoE layer placed into HF transformer blocks. Its core is ``deepspeed.moe.layer.MoE``.

``MoEFeedForward`` holds the stock DeepSpeed layer (``--moe_impl deepspeed``) or ``GroupedMoE``, its subclass whose
forward reads as its four steps: route -> dispatch -> experts -> combine. Either way the module tree and
state-dict names are DeepSpeed's, so checkpoints, resharding and export see the stock names. Shape letters:
moe/router.py.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from torch import nn

from ..metrics.routing import router_z_loss
from ..models.architectures import SWIGLU_FFN_PROJECTIONS
from ..run.config import MoEConfig
from ..run.moe_layout import MoELayout
from .adaptive import dynamic_loss
from .counters import RoutingCounters
from .dispatcher import LocalDispatcher, dispatcher_for
from .experts import GroupedFFNExperts, StackedExperts, local_experts, per_expert_key
from .node_once import NodeOnceDispatcher
from .padding import RealTokens
from .parallel import expert_parallel_rank
from .router import Router, Scoring, recomputing
from .shared import SharedExpertCounters, shared_experts_output, widened_ffn, zero_gate

# Names inside MoEFeedForward as state dicts and DeepSpeed's checkpoints spell them, with either expert path.
ROUTER_WEIGHT = "moe.deepspeed_moe.gate.wg.weight"
ROUTER_SCORE_BIAS = "moe.deepspeed_moe.gate.score_bias"  # aux-loss-free balancing only
EXPERTS_MODULE = "moe.deepspeed_moe.experts"
SHARED_EXPERTS_MODULE, SHARED_EXPERT_GATE_WEIGHT = "shared_experts", "shared_expert_gate.weight"


def expert_weight_key(ffn: str, expert_id: int, projection: str) -> str:
    """The state-dict key of one expert's ``projection`` weight in the MoE layer at module path ``ffn``. In a
    ``layer_{L}_expert_{E}_...`` checkpoint file ``expert_id`` is the global id; in a rank's model, the local one."""
    return f"{ffn}.{EXPERTS_MODULE}.{per_expert_key(expert_id, projection)}"


class MoEFeedForward(nn.Module):
    """Drop-in for a dense FFN: hidden states [B, S, D] in, [B, S, D] out.

    The load-balancing loss, the z-loss and the dynamic loss (each when its weight is not 0) and the routes (each
    token's top-k global expert ids, -1 for a dropped route) of the last forward are kept in ``balance_loss``
    (DeepSpeed's ``l_aux``), ``z_loss``, ``dynamic_loss`` and ``last_topk_ids_TK``, with their weights
    ``aux_loss_coef``, ``z_loss_coef`` and ``dynamic_loss_coef`` (moe/model_layers.py adds them to a trainer's loss);
    ``routing`` adds up the ``Routes`` of every training forward on the device for the metrics (docs/metrics.md).

    With ``cfg.num_shared_experts`` N > 0, ``shared_experts`` (an FFN of the dense FFN's class, N routed experts wide,
    moe/shared.py) is added to every token's output, scaled by sigmoid(``shared_expert_gate``(x)) with
    ``cfg.shared_expert_gate``; ``shared_counters`` sums its metrics. ``ffn_projections`` names the dense FFN's
    projections (into its hidden units, out of them) for the widening and the grouped experts' form. ``expert`` (default: the dense FFN) is the
    module DeepSpeed copies into each local expert (a narrowed one for granular experts, moe/upcycling.py).
    """

    def __init__(self, dense_ffn: nn.Module, hidden_size: int, num_experts: int, cfg: MoEConfig,
                 ffn_projections: tuple[tuple[str, ...], str] = SWIGLU_FFN_PROJECTIONS,
                 expert: Optional[nn.Module] = None):
        super().__init__()
        args = dict(expert=expert if expert is not None else dense_ffn, num_experts=num_experts, ep_size=cfg.ep_size, k=cfg.top_k,
                    capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                    min_capacity=cfg.min_capacity, use_residual=cfg.use_residual,
                    noisy_gate_policy=cfg.noisy_gate_policy, drop_tokens=cfg.drop_tokens, use_rts=cfg.use_rts,
                    top2_2nd_expert_sampling=cfg.top2_2nd_expert_sampling)
        if cfg.moe_impl == "grouped":  # a MoE subclass: same parameters, names, flags and process groups
            self.moe = GroupedMoE(hidden_size, ffn_projections=ffn_projections, scoring=Scoring.of(cfg),
                                  dispatcher=cfg.dispatcher, **args)
        else:
            self.moe = MoE(hidden_size, **args)
            self.moe.deepspeed_moe.gate = router_like(self.moe.deepspeed_moe.gate)
        self.router.force_balanced = cfg.benchmark_balanced_routing
        self.balance_loss: torch.Tensor | None = None
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.router_z_loss_coef
        self.z_loss: torch.Tensor | None = None  # the last forward's, with its graph, when the z-loss is on
        self.dynamic_loss_coef = cfg.dynamic_loss_coef
        self.dynamic_loss: torch.Tensor | None = None  # the last forward's, with its graph, when it is on
        self.last_topk_ids_TK: torch.Tensor | None = None  # the last forward's routes (global ids; for eval counts)
        self.real_tokens: RealTokens | None = None  # the batch's real tokens: padding is not routed (moe/padding.py)
        self.routing = RoutingCounters(num_experts, cfg.top_k)
        shared = cfg.num_shared_experts > 0
        copies = MoELayout.of_layer(cfg, num_experts).shared_copies
        self.shared_experts = widened_ffn(dense_ffn, ffn_projections, copies) if shared else None
        self.shared_expert_gate = (zero_gate(hidden_size, like=next(dense_ffn.parameters()))
                                   if shared and cfg.shared_expert_gate else None)
        self.shared_counters = SharedExpertCounters() if shared else None

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def top_k(self) -> int:
        return self.router.k

    @property
    def router(self) -> Router:
        """The layer's router (DeepSpeed's ``deepspeed_moe.gate``, its state-dict name); its weight is ``router.wg``."""
        return self.moe.deepspeed_moe.gate

    @property
    def experts(self) -> nn.Module:
        """The module holding this rank's experts (its ``parameters()`` are all the local expert parameters):
        DeepSpeed's ``Experts``, or on the grouped path ``StackedExperts`` or ``ExpertLoop``."""
        return self.moe.deepspeed_moe.experts

    def local_expert_weights(self, of: Callable = lambda param: param) -> list[dict[str, torch.Tensor]]:
        """Each local expert's weights by their names in the expert module (``up_proj.weight``...), in module order;
        with ``of``, what ``of(parameter)`` holds for them (e.g. ``lambda p: p.grad``). With ``StackedExperts``
        they are slices of the stacked parameters: in-place writes to the weights change the expert."""
        if isinstance(self.experts, (StackedExperts, GroupedFFNExperts)):
            return [self.experts.expert_weights(i, of) for i in range(self.experts.num_experts)]
        return [{name: of(param) for name, param in expert.named_parameters()}
                for expert in self.experts.deepspeed_experts]

    def global_expert_ids(self) -> range:
        """Global ids of the experts this rank holds (ep rank r holds a contiguous slice)."""
        n_local = self.moe.num_local_experts
        first = expert_parallel_rank(self.moe.ep_size) * n_local
        return range(first, first + n_local)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """With ``real_tokens`` set (the batch has padding), only the real tokens are routed and counted; the
        padding's output is 0 and its ``last_topk_ids_TK`` -1 (moe/padding.py)."""
        if self.real_tokens is None:
            return self._forward_tokens(hidden_states)
        return self._forward_real_tokens(hidden_states)

    @torch.compiler.disable  # the real tokens' count changes with every batch: no graph per count (--compile)
    def _forward_real_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        real = self.real_tokens
        if not isinstance(self.moe, GroupedMoE) and self.moe.ep_size > 1 and self.router.drop_tokens:
            raise ValueError("--moe_impl deepspeed with --drop_tokens at ep_size > 1 cannot leave padding out of the "
                             "capacity (its all-to-all needs the same token count on every rank): use --moe_impl "
                             "grouped (the default)")
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.router.real_rows = real.rows_N, real.rows  # the sequence balance loss counts per batch row
        try:
            y_ND = self._forward_tokens(real.take(x_TD).unsqueeze(0)).squeeze(0)
        finally:
            self.router.real_rows = None
        if self.last_topk_ids_TK is not None:
            self.last_topk_ids_TK = real.put(self.last_topk_ids_TK, fill=-1)
        return real.put(y_ND).reshape(hidden_states.shape)

    def _forward_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output, self.balance_loss, _ = self.moe(hidden_states)
        routes, self.router.last_routes = self.router.last_routes, None
        self.last_topk_ids_TK = routes.topk_ids_TK if routes is not None else None
        self.z_loss = router_z_loss(routes.logits_TE) if self.z_loss_coef and routes is not None else None
        self.dynamic_loss = dynamic_loss(routes.logits_TE) if self.dynamic_loss_coef and routes is not None else None
        if self.training and self.routing.enabled and routes is not None and not recomputing():
            self.routing.add(routes)
        if self.shared_experts is not None:
            output = output + self.shared_output(hidden_states, routed=output)
        return output

    def shared_output(self, hidden_states: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """The shared experts' (gated) output; a training forward's is counted with its ``routed`` output."""
        shared, gate = shared_experts_output(self.shared_experts, self.shared_expert_gate, hidden_states)
        if self.training and self.routing.enabled and not recomputing():
            self.shared_counters.add(routed, shared, gate)
        return shared

    @torch.no_grad()
    def expert_direction_sum_sq(self, chunk_elements: int = 2**24) -> torch.Tensor:
        """|sum_e w_e / |w_e||^2 over all global experts e of this layer, w_e the expert's flattened weights, as a
        float64 scalar tensor on the device (read to the host by the caller, once for every layer).

        It equals E + 2 x (sum of the pairwise cosines), so no expert's weights leave its rank: each rank
        sums its local experts' unit vectors and, with ep_size > 1, the sums are all-reduced over the
        expert-parallel group, ``chunk_elements`` (fp32) at a time. Every rank must call it.
        """
        ep_group, ep_size = self.moe.deepspeed_moe.ep_group, self.moe.ep_size
        experts = [list(weights.values()) for weights in self.local_expert_weights()]
        norms_L = [torch.stack([torch.linalg.vector_norm(p.detach().float()).double() for p in weights])
                   .square().sum().sqrt() for weights in experts]
        total = torch.zeros((), dtype=torch.float64, device=norms_L[0].device)
        for same_param in zip(*experts):
            flat_L = [p.detach().flatten() for p in same_param]
            for start in range(0, flat_L[0].numel(), chunk_elements):
                direction_sum = sum(flat[start:start + chunk_elements].float() / norm
                                      for flat, norm in zip(flat_L, norms_L))
                if ep_size > 1:
                    dist.all_reduce(direction_sum, group=ep_group)
                total += direction_sum.double().square().sum()
        return total


class GroupedMoE(MoE):
    """``deepspeed.moe.layer.MoE`` with the grouped, index-based expert path (same arguments, plus
    ``ffn_projections``: the expert FFN's (input projections, output projection) by attribute name, without which its
    experts run one by one; ``scoring``: the router's options beyond DeepSpeed's gate). DeepSpeed builds the gate, the
    local experts (with their expert-parallel flags) and the process groups; the MOELayer is replaced by
    ``RouteDispatchCombine``; ``dispatcher``: --dispatcher."""

    def __init__(self, *args, ffn_projections: Optional[tuple[tuple[str, ...], str]] = None,
                 scoring: Scoring = Scoring(), dispatcher: str = "per_route", **kwargs):
        super().__init__(*args, **kwargs)
        stock = self.deepspeed_moe
        experts = local_experts(stock.experts, ffn_projections, self.expert_group_name)
        self.deepspeed_moe = RouteDispatchCombine(router_like(stock.gate, scoring), experts, stock.ep_group_name,
                                             stock.ep_size, stock.num_local_experts, dispatcher)


class RouteDispatchCombine(MOELayer):
    """MOELayer whose forward never builds [tokens, experts, capacity] tensors."""

    def __init__(self, gate: Router, experts: nn.Module, ep_group_name: str, ep_size: int, num_local_experts: int,
                 dispatcher: str = "per_route"):
        super().__init__(gate, experts, ep_group_name, ep_size, num_local_experts)
        self.dispatcher: LocalDispatcher = (
            NodeOnceDispatcher(num_local_experts, ep_size) if dispatcher == "node_once" and ep_size > 1
            else dispatcher_for(num_local_experts, ep_size, gate.drop_tokens or gate.scoring.leaves_routes_unrouted))

    def _set_ep_group(self, ep_group) -> None:
        super()._set_ep_group(ep_group)
        self.dispatcher.ep_group = ep_group

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """route -> dispatch -> experts -> combine.

        1. route: one router GEMM; DeepSpeed's gate rules give each token's top-k global expert ids and fp32
           weights (dropless: every route kept; capacity mode: DeepSpeed's own gating drops, marked -1);
        2. dispatch: routes sorted by expert and their tokens gathered (at ep_size > 1 also sent to the ranks
           holding their experts);
        3. experts: the local experts on their rows (one grouped GEMM, or one by one);
        4. combine: rows back in token order, each token's k outputs summed with the routing weights in fp32
           (--dispatcher node_once: a node's share summed there, moe/node_once.py).
        Sets ``l_aux`` and ``exp_counts`` as DeepSpeed's MOELayer does.
        """
        if used_token is not None:
            raise ValueError("used_token is not supported by --moe_impl grouped; use --moe_impl deepspeed")
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        routes = self.gate.route(x_TD, hidden_states.shape[-2])         # 1. route (sequences of S tokens)
        x_ND, counts_L, sorted_ = self.dispatcher.dispatch(x_TD, routes)  # 2. dispatch
        y_ND = self.experts(x_ND, counts_L)                             # 3. experts
        out_TD = self.dispatcher.weighted_combine(y_ND, sorted_, routes.weights_TK)  # 4. combine
        if routes.null_weight_T is not None:  # identity null experts: the token's input, weighted, on its own rank
            out_TD = out_TD + routes.null_weight_T.unsqueeze(1) * x_TD.to(out_TD.dtype)
        self.l_aux, self.exp_counts = routes.balance_loss, routes.chosen_E
        return out_TD.to(hidden_states.dtype).reshape(hidden_states.shape)


def router_like(gate, scoring: Scoring = Scoring()) -> Router:
    """A ``Router`` with the settings of DeepSpeed's ``TopKGate`` ``gate`` and its very router weight (``wg``), plus
    the options of ``scoring`` (with aux-loss-free balancing, a zero expert bias). With null experts the router
    weight gets their N rows: a new [E + N, D] weight, zero until surgery draws it (the router starts fresh)."""
    outputs = gate.wg.out_features + scoring.num_null_experts
    with torch.device("meta"):  # its own wg is replaced below: allocate nothing and draw no random numbers
        router = Router(gate.wg.in_features, outputs, gate.k, gate.capacity_factor,
                        gate.eval_capacity_factor, gate.min_capacity, gate.noisy_gate_policy, gate.drop_tokens,
                        gate.use_rts, gate.ep_group, gate.top2_2nd_expert_sampling, scoring=scoring)
    if scoring.num_null_experts:
        weight = gate.wg.weight
        router.wg.to_empty(device=weight.device).to(weight.dtype)
        with torch.no_grad():
            router.wg.weight.zero_()
    else:
        router.wg = gate.wg
    if scoring.router_bias_update_rate > 0:
        router.add_score_bias(gate.wg.weight.device)
    return router


def moe_layers_of(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]
