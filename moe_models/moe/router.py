"""Step 1 of an MoE forward: the router. One GEMM per forward gives the logits; DeepSpeed's gate rules turn them
into each token's top-k experts and weights, as one ``Routes`` record that the dispatcher, the combine and the
routing counters all read.

Shape letters: moe/__init__.py.

Two rule sets:
  - dropless: the rules of DeepSpeed's top1/top2/topk gating (fp32 logits, Jitter/RSample noise, Gumbel-sampled
    second expert, top-1 weights un-normalised, top-2/top-k renormalised, the same balance loss) without the
    capacity. DeepSpeed's ``TopKGate`` with ``drop_tokens=False`` reads the busiest expert's count to the host
    (and all-reduces it over the expert-parallel group) to size a capacity a dropless path does not need; its
    functions cannot skip that, so these rules are written here.
  - capacity: the rules of the same functions with drop_tokens (DeepSpeed's capacity computed as it does, in fp32,
    random token selection, the same tie-breaking), so routes are dropped exactly as the stock layer drops them.
    DeepSpeed's functions read the capacity (a tensor) back to the host to size a selection, and ``F.one_hot``
    checks its input on the host on CPU; the capacity is known from the shapes, so these rules read nothing back.

Any of the options beyond DeepSpeed's gate (``Scoring``: sigmoid scores, renormalisation, a scaling factor, an
aux-loss-free bias, another balance-loss scope) switches to the scored rule, as DeepSeek-V3, Qwen3-MoE and
Megatron-Core route: scores -> deterministic top-k of the scores (plus the bias) -> the chosen scores as weights,
with the balance loss of moe/balance.py and, with drops, a capacity that keeps each expert's highest-weighted routes.
DeepSpeed's gating functions take the softmax of the logits and choose by it, so they can neither score by sigmoid
nor choose by biased scores: this rule is written here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import (TopKGate, gumbel_rsample, multiplicative_jitter, top1gating, top2gating,
                                      topkgating)

from .adaptive import top_p_choice, without_null_routes
from .balance import (StepLoad, balance_probs, global_batch_balance_loss, sequence_balance_loss,
                      sequence_balance_loss_by_rows, switch_balance_loss)
from .routes import Routes, _mask, _renormalised, recomputing, routes_per_expert


@dataclass(frozen=True)
class Scoring:
    """The router options beyond DeepSpeed's gate, each under its MoEConfig flag's name (docs/routing.md), as the
    router uses them: an option that does nothing in this configuration at its default. All at their defaults, the
    router follows DeepSpeed's rules; otherwise the scored rule."""

    score_function: str = "softmax"                 # softmax | sigmoid
    norm_topk_prob: Optional[bool] = None           # None: DeepSpeed's rule (top-1 keeps its score, top-k > 1 rescales)
    routed_scaling_factor: float = 1.0
    aux_loss_type: str = "micro_batch"              # micro_batch | sequence | global_batch
    router_bias_update_rate: float = 0.0            # > 0: aux-loss-free balancing
    expert_groups: int = 1                          # group-limited routing: the experts in this many groups...
    max_groups_per_token: int = 1                   # ...of which a token routes into its best this many (1 of 1: none)
    num_null_experts: int = 0                       # router outputs E .. E + N - 1: zero-computation experts
    null_expert_target_real_k: Optional[float] = None  # the controller's mean real experts per token (with the bias)
    top_p: Optional[float] = None                   # top-p routing: experts until their probabilities reach p...
    min_k: int = 1                                  # ...at least min_k of them (at most top_k)
    null_expert_output: str = "zero"                # a null expert's output: zero | identity (its input, weighted)

    @classmethod
    def of(cls, moe) -> "Scoring":
        """From a MoEConfig, field by field; an option that does nothing here at its default (a limit that keeps
        every group, the null experts' settings without null experts, min_k without top_p)."""
        values = {f.name: getattr(moe, f.name) for f in dataclasses.fields(cls)}
        if moe.max_groups_per_token is None or moe.max_groups_per_token >= moe.expert_groups:
            values.update(expert_groups=1, max_groups_per_token=1)
        if not moe.num_null_experts:
            values.update(null_expert_target_real_k=None, null_expert_output="zero")
        if moe.top_p is None:
            values.update(min_k=1)
        return cls(**values)

    @property
    def is_deepspeed(self) -> bool:
        return self == Scoring()

    @property
    def leaves_routes_unrouted(self) -> bool:
        """Whether routes can be marked -1 without a capacity (null experts, top-p's cut)."""
        return self.num_null_experts > 0 or self.top_p is not None

    def renormalises(self, top_k: int) -> bool:
        return self.norm_topk_prob if self.norm_topk_prob is not None else top_k > 1


class Router(TopKGate):
    """DeepSpeed's ``TopKGate`` (same arguments, parameter ``wg`` and process group) whose logits are computed once
    per forward and kept in the ``Routes`` of the last forward (``last_routes``), for the routing counters.

    ``route`` is the grouped layer's step 1; ``forward`` keeps TopKGate's contract, so the stock ``MOELayer``
    (``--moe_impl deepspeed``) runs through it unchanged. ``scoring`` (keyword only) holds the options beyond
    DeepSpeed's gate; with aux-loss-free balancing the router holds ``score_bias`` [E] (fp32, in state dicts and
    checkpoints; ``add_score_bias``). With null experts the router weight ``wg`` has E + N rows (the bias E + N
    values); ``num_real_experts`` is E.
    """

    def __init__(self, *args, scoring: Scoring = Scoring(), **kwargs):
        super().__init__(*args, **kwargs)
        self.scoring = scoring
        self.last_routes: Optional[Routes] = None
        self.register_buffer("score_bias", None)
        self.step_load = StepLoad()  # this optimizer step's routes per expert (moe/balance.py)
        self.force_balanced = False  # --benchmark_balanced_routing: ``balanced_routes`` replaces the choice
        self.real_rows: Optional[tuple[torch.Tensor, int]] = None  # (row of each token, rows): a padded batch's real
        #                                                  tokens alone (moe/padding.py), for the sequence balance loss

    @property
    def num_real_experts(self) -> int:
        return self.wg.out_features - self.scoring.num_null_experts

    def add_score_bias(self, device: torch.device) -> None:
        """The aux-loss-free bias, zero at the start. (Its name must not contain "expert": DeepSpeed saves every state
        key with that word as an expert parameter.)"""
        self.score_bias = torch.zeros(self.wg.out_features, dtype=torch.float32, device=device)

    def _apply(self, fn, recurse=True):
        """As nn.Module's, but the score bias keeps fp32 (a bf16 engine casts the module): the bias moves by
        small steps that bf16 would round away. It follows the module to its device."""
        bias = self._buffers.pop("score_bias")
        super()._apply(fn, recurse)
        self._buffers["score_bias"] = bias if bias is None else bias.to(fn(bias).device)
        return self

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 router logits exactly as ``TopKGate.forward`` computes them (jitter only in training)."""
        x_TD = x_TD.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x_TD = multiplicative_jitter(x_TD, device=x_TD.device)
        return F.linear(x_TD, self.wg.weight.float())

    def route(self, x_TD: torch.Tensor, tokens_per_sequence: Optional[int] = None) -> Routes:
        """Every token's routes (tokens sequence after sequence, ``tokens_per_sequence`` each; default: one
        sequence). DeepSpeed's rules: with a capacity (drop_tokens) by DeepSpeed's gating, else by the dropless
        rules; with any ``scoring`` option, by the scored rule."""
        logits_TE = self.logits(x_TD)
        if not self.scoring.is_deepspeed:
            routes = self._scored_routes(logits_TE, tokens_per_sequence or logits_TE.shape[0])
        elif self.drop_tokens:
            routes = capacity_routes(logits_TE, self.k, self.capacity_factor if self.training else
                                     self.eval_capacity_factor, self.min_capacity,
                                     self.noisy_gate_policy == "RSample" and self.training,
                                     self.top2_2nd_expert_sampling, self.use_rts)
        else:
            routes = dropless_routes(logits_TE, self.k, self.noisy_gate_policy == "RSample" and self.training,
                                     self.top2_2nd_expert_sampling)
        if self.force_balanced:
            routes = balanced_routes(routes, self.k)
        if self.training and self.score_bias is not None and not recomputing():
            self.step_load.add_local(routes.chosen_E if routes.chosen_null is None
                                     else torch.cat([routes.chosen_E, routes.chosen_null]))
        self.last_routes = routes
        return routes

    def _scored_routes(self, logits_TE: torch.Tensor, tokens_per_sequence: int) -> Routes:
        """The scored rule: scores -> top-k of the scores plus the expert bias (with top-p: cut where the
        probabilities reach p, moe/adaptive.py) -> the chosen scores (rescaled, scaled) as weights; the balance loss
        as ``aux_loss_type`` says, null experts counted as experts; routes to null experts marked -1; drops above the
        real experts' capacity with drop_tokens."""
        s = self.scoring
        T, E_all = logits_TE.shape
        E = E_all - s.num_null_experts
        scores_TE = logits_TE.sigmoid() if s.score_function == "sigmoid" else F.softmax(logits_TE, dim=1)
        choice_TE = scores_TE if self.score_bias is None else scores_TE + self.score_bias
        if s.max_groups_per_token < s.expert_groups:
            choice_TE = within_best_groups(choice_TE, s.expert_groups, s.max_groups_per_token)
        if s.top_p is not None:
            topk_ids_TK = top_p_choice(choice_TE, scores_TE, self.k, s.min_k, s.top_p)
            weights_TK = torch.where(topk_ids_TK >= 0, scores_TE.gather(1, topk_ids_TK.clamp(min=0)), 0.0)
        else:
            topk_ids_TK = choice_TE.topk(self.k, dim=1).indices
            weights_TK = scores_TE.gather(1, topk_ids_TK)
        if s.renormalises(self.k):
            weights_TK = _renormalised(weights_TK)
        weights_TK = weights_TK * s.routed_scaling_factor
        chosen_E = routes_per_expert(topk_ids_TK, E_all)
        probs_TE = balance_probs(scores_TE)
        if s.aux_loss_type == "sequence" and self.real_rows is not None:
            balance_loss = sequence_balance_loss_by_rows(probs_TE, topk_ids_TK, *self.real_rows)
        elif s.aux_loss_type == "sequence":
            balance_loss = sequence_balance_loss(probs_TE, topk_ids_TK, tokens_per_sequence)
        elif s.aux_loss_type == "global_batch" and self.training:  # a recompute reuses its forward's counts
            step_counts_E1 = self.step_load.all_ranks_E1 if recomputing() else self.step_load.add_all_ranks(chosen_E, T)
            balance_loss = global_batch_balance_loss(probs_TE, step_counts_E1, self.k)
        else:  # micro_batch (and global_batch in eval, where there is no step to count over)
            routes = T * self.k if s.top_p is None else chosen_E.sum().clamp(min=1)
            balance_loss = switch_balance_loss(probs_TE, chosen_E, routes)
        chosen_null = null_weight_T = None
        if s.num_null_experts:
            if s.null_expert_output == "identity":  # the weight of the token's input in its output
                null_weight_T = torch.where(topk_ids_TK >= E, weights_TK, 0.0).sum(dim=1)
            topk_ids_TK, weights_TK = without_null_routes(topk_ids_TK, weights_TK, E)
            chosen_E, chosen_null = chosen_E[:E], chosen_E[E:]
        kept_E = chosen_E
        if self.drop_tokens:
            capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
            topk_ids_TK, weights_TK = drop_over_capacity(topk_ids_TK, weights_TK, E, capacity(
                T, self.k, E, capacity_factor, self.min_capacity))
            kept_E = routes_per_expert(topk_ids_TK, E)
        return Routes(logits_TE, topk_ids_TK, weights_TK, chosen_E, kept_E, balance_loss, chosen_null, null_weight_T)

    def forward(self, input: torch.Tensor, used_token: Optional[torch.Tensor] = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        """TopKGate.forward: DeepSpeed's gate output for the stock MOELayer; the Routes are kept beside it."""
        logits_TE = self.logits(input)
        output = self._deepspeed_gating(logits_TE, used_token, sparse_routes, use_tutel)
        self.last_routes = gate_output_routes(logits_TE, output) if sparse_routes and not use_tutel else None
        return output

    def _deepspeed_gating(self, logits_TE: torch.Tensor, used_token, sparse_routes: bool, use_tutel: bool = False):
        """What TopKGate.forward does after its GEMM: DeepSpeed's top1/top2/topk gating functions (timers left out)."""
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            return top1gating(logits_TE, capacity_factor, self.min_capacity, used_token,
                              self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts,
                              self.ep_group, sparse_routes, use_tutel)
        if self.k == 2:
            return top2gating(logits_TE, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                              self.top2_2nd_expert_sampling, sparse_routes)
        return topkgating(logits_TE, self.k, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group,
                          sparse_routes=sparse_routes)


def gate_output_routes(logits_TE: torch.Tensor, sparse_gate_output: tuple) -> Routes:
    """Routes from DeepSpeed's gating in its sparse form (the stock layer's gate, ``--moe_impl deepspeed``): (l_aux,
    capacity, E, indices [K, T] with -1 for a route dropped by capacity, locations, gates [K, T], exp_counts [E]
    before drops)."""
    l_aux, _capacity, num_experts, indices_KT, _locations_KT, gates_KT, chosen_E = sparse_gate_output
    topk_ids_TK = indices_KT.t().long()
    return Routes(logits_TE, topk_ids_TK, gates_KT.t(), chosen_E, routes_per_expert(topk_ids_TK, logits_TE.shape[1]),
                  l_aux)


def capacity_routes(logits_TE: torch.Tensor, k: int, capacity_factor: float, min_capacity: int, rsample: bool,
                    sample_second: bool, use_rts: bool) -> Routes:
    """Every token's top-k experts and weights by the rules of DeepSpeed's top1/top2/topk gating with drop_tokens:
    each expert keeps at most ``deepspeed_capacity`` routes, chosen as DeepSpeed chooses them (top-1: at random with
    ``use_rts``, else by token order; top-2: first choices first, then token order; top-k: the highest weights), the
    others dropped (id -1, weight 0). ``rsample``: top-1 picks by Gumbel-perturbed logits; ``sample_second``: top-2
    picks its second expert with Gumbel noise. The same random draws as DeepSpeed's, in the same order; no host
    read (DeepSpeed's own functions read the capacity back to size their selection)."""
    T, E = logits_TE.shape
    probs_TE = F.softmax(logits_TE, dim=1)
    me_E = probs_TE.mean(dim=0)
    if k == 1:
        chooser_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device) if rsample else probs_TE
        capacity = deepspeed_capacity(T, E, capacity_factor, min_capacity)
        ids_T1 = chooser_TE.argmax(dim=1, keepdim=True)
        mask_TE = torch.zeros_like(probs_TE, dtype=torch.int64).scatter_(1, ids_T1, 1)
        chosen_E = mask_TE.sum(dim=0)
        balance_loss = (me_E * mask_TE.float().mean(dim=0)).sum() * E
        # random token selection: DeepSpeed's Uniform(0, 1).rsample is torch.rand of the same shape
        priority_TE = mask_TE * torch.rand(mask_TE.shape, device=logits_TE.device) if use_rts else mask_TE
        if T < min_capacity:
            raise ValueError(f"{T} tokens in a forward are fewer than min_capacity ({min_capacity}); set "
                             "--min_capacity 0 or use a larger batch")
        kept_CE = priority_TE.topk(min(capacity, T), dim=0).indices
        mask_TE = mask_TE * torch.zeros_like(mask_TE).scatter_(0, kept_CE, 1)
        topk_ids_TK = torch.where(mask_TE.sum(dim=1, keepdim=True) > 0, ids_T1, -1)
        weights_TK = (probs_TE * mask_TE).sum(dim=1, keepdim=True)
    elif k == 2:
        first_T = probs_TE.argmax(dim=1)
        first_TE = torch.zeros_like(probs_TE, dtype=torch.int64).scatter_(1, first_T[:, None], 1)
        chooser_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device) if sample_second else logits_TE
        second_T = chooser_TE.masked_fill(first_TE.bool(), float("-inf")).argmax(dim=1)
        second_TE = torch.zeros_like(first_TE).scatter_(1, second_T[:, None], 1)
        # a route's place in its expert's queue: every first choice before every second choice, then token order
        first_place_TE = first_TE.cumsum(dim=0) - 1
        second_place_TE = second_TE.cumsum(dim=0) - 1 + first_TE.sum(dim=0, keepdim=True)
        balance_loss = (me_E * first_TE.float().mean(dim=0)).mean() * E * E
        chosen_E = (first_TE + second_TE).sum(dim=0)
        capacity = deepspeed_capacity(T, E, capacity_factor * 2, min_capacity)
        first_TE = first_TE * (first_place_TE < capacity)
        second_TE = second_TE * (second_place_TE < capacity)
        weights_TK = torch.stack([torch.einsum("se,se->s", probs_TE, first_TE.float()),
                                  torch.einsum("se,se->s", probs_TE, second_TE.float())], dim=1)
        weights_TK = weights_TK / weights_TK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).eps)
        topk_ids_TK = torch.stack([torch.where(first_TE.any(dim=1), first_T, -1),
                                   torch.where(second_TE.any(dim=1), second_T, -1)], dim=1)
    else:
        top_probs_TK, ids_TK = torch.topk(probs_TE, k=k, dim=1)
        mask_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, ids_TK, True)
        chosen_E = mask_TE.sum(dim=0)
        balance_loss = (me_E * mask_TE.float().mean(dim=0)).mean() * E * E / k
        capacity = deepspeed_capacity(T, E, capacity_factor * k, min_capacity)
        chosen_probs_TE = torch.zeros_like(probs_TE).scatter(1, ids_TK, top_probs_TK)
        kept_CE = torch.topk(chosen_probs_TE, k=min(capacity, T), dim=0, sorted=False).indices
        mask_TE = mask_TE & torch.zeros_like(mask_TE).scatter_(0, kept_CE, True)
        weights_TE = probs_TE * mask_TE
        weights_TE = weights_TE / weights_TE.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights_TE.dtype).eps)
        kept_TK = mask_TE.gather(1, ids_TK)
        topk_ids_TK = torch.where(kept_TK, ids_TK, -1)
        weights_TK = weights_TE.gather(1, ids_TK)
    return Routes(logits_TE, topk_ids_TK, weights_TK, chosen_E, routes_per_expert(topk_ids_TK, E), balance_loss)


def deepspeed_capacity(tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's ``_capacity``: ceil(tokens / experts x capacity_factor), at least min_capacity, in fp32 as its
    tensors compute it (fp32 can round a product up past an integer that float64 would keep). ``capacity_factor``
    is DeepSpeed's per-route factor (x 2 for top-2, x k for top-k)."""
    return max(math.ceil(_fp32(_fp32(tokens / num_experts) * _fp32(capacity_factor))), min_capacity)


def _fp32(x: float) -> float:
    """x rounded to the nearest fp32 value (ties to even), in plain Python so that torch.compile folds it. The product
    of two fp32 values is exact in float64, so _fp32 of it is fp32's product."""
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * 2**24) / 2**24, exponent)


def dropless_routes(logits_TE: torch.Tensor, k: int, rsample: bool, sample_second: bool) -> Routes:
    """Every token's top-k experts and weights by the rules of DeepSpeed's top1/top2/topk gating, none dropped.

    ``rsample``: top-1 picks by Gumbel-perturbed logits (RSample noise, training only); ``sample_second``: top-2
    picks its second expert with Gumbel noise (DeepSpeed does so in eval mode too)."""
    probs_TE = F.softmax(logits_TE, dim=1)
    num_experts = probs_TE.shape[1]
    me_E = probs_TE.mean(dim=0)
    if k == 1:
        chooser_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device) if rsample else probs_TE
        topk_ids_TK = chooser_TE.argmax(dim=1, keepdim=True)
        weights_TK = probs_TE.gather(1, topk_ids_TK)  # top-1 keeps the raw probability
        balance_loss = (me_E * _mask(probs_TE, topk_ids_TK).mean(dim=0)).sum() * num_experts
    elif k == 2:
        first_T1 = probs_TE.argmax(dim=1, keepdim=True)
        chooser_TE = logits_TE + gumbel_rsample(logits_TE.shape, device=logits_TE.device) if sample_second else logits_TE
        first_mask_TE = _mask(probs_TE, first_T1)
        second_T1 = chooser_TE.masked_fill(first_mask_TE.bool(), float("-inf")).argmax(dim=1, keepdim=True)
        topk_ids_TK = torch.cat([first_T1, second_T1], dim=1)
        weights_TK = _renormalised(probs_TE.gather(1, topk_ids_TK))
        balance_loss = (me_E * first_mask_TE.mean(dim=0)).mean() * num_experts * num_experts
    else:
        top_probs_TK, topk_ids_TK = torch.topk(probs_TE, k=k, dim=1)
        weights_TK = _renormalised(top_probs_TK)
        balance_loss = (me_E * _mask(probs_TE, topk_ids_TK).mean(dim=0)).mean() * num_experts * num_experts / k
    counts_E = routes_per_expert(topk_ids_TK, num_experts)
    return Routes(logits_TE, topk_ids_TK, weights_TK, counts_E, counts_E, balance_loss)  # dropless: kept = chosen


def within_best_groups(choice_TE: torch.Tensor, groups: int, keep: int) -> torch.Tensor:
    """Group-limited routing (DeepSeek-V3, arXiv 2412.19437 section 2.1.2; GLM4-MoE's ``n_group``/``topk_group``):
    the E experts in ``groups`` groups of consecutive ids; each token keeps the ``keep`` groups whose two best choice
    scores sum highest, and every expert outside them gets -inf, so the top-k falls inside them."""
    T, E = choice_TE.shape
    group_scores_TG = choice_TE.view(T, groups, E // groups).topk(2, dim=-1).values.sum(dim=-1)
    best_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(
        1, group_scores_TG.topk(keep, dim=-1).indices, True)
    return choice_TE.masked_fill(~best_TG.repeat_interleave(E // groups, dim=1), float("-inf"))


def balanced_routes(routes: Routes, k: int) -> Routes:
    """--benchmark_balanced_routing: token t's routes go to experts (t k + j) mod E, j < k (k distinct experts when
    k <= E), every expert within one route of an even share, as torchtitan's debug switch spreads them; the weights
    are the router's softmax probabilities at those experts (renormalised for k > 1), so the router stays in the
    graph and costs what it costs. The balance loss is the real routes'."""
    T, E = routes.logits_TE.shape
    ids_TK = (torch.arange(T * k, device=routes.logits_TE.device) % E).view(T, k)
    weights_TK = F.softmax(routes.logits_TE, dim=1).gather(1, ids_TK)
    counts_E = routes_per_expert(ids_TK, E)
    return Routes(routes.logits_TE, ids_TK, _renormalised(weights_TK) if k > 1 else weights_TK, counts_E, counts_E,
                  routes.balance_loss)


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Routes one expert may take: capacity_factor x its even share of the routes, at least min_capacity (as
    DeepSpeed's top-k gating sizes it)."""
    return max(math.ceil(tokens * top_k * capacity_factor / num_experts), min_capacity)


def drop_over_capacity(topk_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                       capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert keeps at most ``capacity`` of its routes, those of highest weight; the others are dropped (id -1,
    weight 0); routes already -1 (null experts, top-p's cut) stay so. The capacity is known on the host from shapes,
    so this reads nothing back."""
    T = topk_ids_TK.shape[0]
    ids_TK = torch.where(topk_ids_TK < 0, num_experts, topk_ids_TK)  # a spare column for the unrouted
    priority_TE = torch.full((T, num_experts + 1), float("-inf"), dtype=weights_TK.dtype, device=weights_TK.device)
    priority_TE.scatter_(1, ids_TK, weights_TK.detach())
    priority_TE[:, num_experts] = float("-inf")
    top_CE, tokens_CE = priority_TE.topk(min(capacity, T), dim=0)
    keep_TE = torch.zeros_like(priority_TE, dtype=torch.bool).scatter_(0, tokens_CE, top_CE > float("-inf"))
    keep_TK = keep_TE.gather(1, ids_TK)
    return torch.where(keep_TK, topk_ids_TK, -1), torch.where(keep_TK, weights_TK, 0.0)
