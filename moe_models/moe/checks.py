"""The MoE settings checked on their own, before any model or world exists (the checks of expert parallelism against
the world and ZeRO: moe/parallel.py). training/validate.py gathers them with every other part's."""

from __future__ import annotations

import dataclasses

from ..run.config import MoEConfig
from ..run.config_values import too_small
from ..run.moe_layout import expert_counts, resolve_moe_layers
from .balance import AUX_LOSS_TYPES
from .router import Scoring

EXPERT_INITS = ("copy", "copy_noise", "random", "granular", "drop")


def moe_problems(moe: MoEConfig) -> list[str]:
    """Problems in MoE settings alone (no model or world needed)."""
    problems: list[str] = []
    counts = expert_counts(moe)
    for count in counts:
        if count < 1:
            problems.append(f"num_experts ({count}) must be >= 1")
            continue
        if moe.top_k > count:
            problems.append(f"top_k ({moe.top_k}) must be <= num_experts ({count})")
    problems += too_small(moe, ("top_k", "ep_size")) + too_small(moe, ("min_capacity", "num_shared_experts"), minimum=0)
    problems += shared_expert_problems(moe)
    for name in ("capacity_factor", "eval_capacity_factor"):
        if getattr(moe, name) <= 0:
            problems.append(f"{name} ({getattr(moe, name)}) must be > 0")
    for name in ("aux_loss_coef", "router_z_loss_coef", "dynamic_loss_coef"):
        if getattr(moe, name) < 0:
            problems.append(f"{name} ({getattr(moe, name)}) must be >= 0")
    if moe.expert_noise_std < 0:
        problems.append(f"expert_noise_std ({moe.expert_noise_std}) must be >= 0")
    if moe.noisy_gate_policy not in (None, "Jitter", "RSample"):
        problems.append(f"noisy_gate_policy ({moe.noisy_gate_policy!r}) must be None, 'Jitter' or 'RSample'")
    problems += scoring_problems(moe)
    if moe.expert_init not in EXPERT_INITS:
        problems.append(f"expert_init ({moe.expert_init!r}) must be one of {', '.join(map(repr, EXPERT_INITS))}")
    problems += upcycling_problems(moe, counts)
    if isinstance(moe.moe_layers, str) and moe.moe_layers != "all":
        try:  # shape only; indices are checked against the model once its depth is known
            resolve_moe_layers(moe.moe_layers, num_layers=10**6)
        except ValueError as err:
            problems.append(str(err))
    return problems


def shared_expert_problems(moe: MoEConfig) -> list[str]:
    """What does not go with --num_shared_experts / --shared_expert_gate."""
    problems = []
    if moe.shared_expert_gate and moe.num_shared_experts < 1:
        problems.append("shared_expert_gate gates the shared experts' output, but num_shared_experts is "
                        f"{moe.num_shared_experts}: pass --num_shared_experts 1 or more, or drop --shared_expert_gate")
    if moe.use_residual and moe.num_shared_experts > 0:
        problems.append("use_residual and num_shared_experts both keep an always-on dense FFN beside the routed "
                        "experts: use one (shared experts also export to HF classes; docs/routing.md)")
    return problems


def scoring_problems(moe: MoEConfig) -> list[str]:
    """Problems with the router options beyond DeepSpeed's gate (moe/router.py ``Scoring``)."""
    problems = []
    if moe.score_function not in ("softmax", "sigmoid"):
        problems.append(f"score_function ({moe.score_function!r}) must be 'softmax' or 'sigmoid'")
    if moe.aux_loss_type not in AUX_LOSS_TYPES:
        problems.append(f"aux_loss_type ({moe.aux_loss_type!r}) must be one of {', '.join(AUX_LOSS_TYPES)}")
    if moe.routed_scaling_factor <= 0:
        problems.append(f"routed_scaling_factor ({moe.routed_scaling_factor}) must be > 0")
    if moe.router_bias_update_rate < 0:
        problems.append(f"router_bias_update_rate ({moe.router_bias_update_rate}) must be >= 0 (0 = off)")
    problems += group_problems(moe) + adaptive_problems(moe)
    if moe.benchmark_balanced_routing and (moe.moe_impl == "deepspeed" or moe.drop_tokens):
        problems.append("--benchmark_balanced_routing needs --moe_impl grouped and --drop_tokens false (the stock "
                        "gate routes inside DeepSpeed's layer; an even load needs no capacity)")
    if moe.dispatcher == "node_once" and moe.moe_impl == "deepspeed":
        problems.append("--dispatcher node_once needs --moe_impl grouped (the stock layer has its own exchange)")
    scoring = Scoring.of(moe)  # its fields are the flags beyond DeepSpeed's gate; any off its default: the scored rule
    chosen = [f"--{f.name} {getattr(moe, f.name)}" for f in dataclasses.fields(Scoring)
              if getattr(scoring, f.name) != f.default]
    if chosen and moe.moe_impl == "deepspeed":
        problems.append(f"{', '.join(chosen)}: the stock DeepSpeed gate (--moe_impl deepspeed) routes by softmax top-k "
                        "with its own balance loss only; use --moe_impl grouped (the default), which keeps the same "
                        "DeepSpeed layer and checkpoint names")
    if chosen and moe.noisy_gate_policy == "RSample":
        problems.append(f"noisy_gate_policy RSample with {', '.join(chosen)}: RSample belongs to DeepSpeed's top-1 rule, "
                        "and these options route by deterministic top-k of the scores; use Jitter or no noise")
    return problems


def adaptive_problems(moe: MoEConfig) -> list[str]:
    """--num_null_experts, --null_expert_target_real_k, --top_p and --min_k (moe/adaptive.py): their ranges and what
    they do not go with."""
    problems, nulls, target, p = [], moe.num_null_experts, moe.null_expert_target_real_k, moe.top_p
    if nulls < 0:
        problems.append(f"num_null_experts ({nulls}) must be >= 0 (0 = off)")
    if moe.null_expert_output != MoEConfig.null_expert_output and nulls < 1:
        problems.append(f"--null_expert_output {moe.null_expert_output} says what null experts output: it needs "
                        "--num_null_experts >= 1")
    adaptive = [flag for flag, on in (("--num_null_experts", nulls > 0), ("--top_p", p is not None)) if on]
    if adaptive and moe.max_groups_per_token is not None:
        problems.append(f"{' and '.join(adaptive)} with --max_groups_per_token: group-limited routing chooses within "
                        "groups of real experts and is not combined with them; drop one")
    if adaptive and moe.benchmark_balanced_routing:
        problems.append(f"{' and '.join(adaptive)} with --benchmark_balanced_routing: the benchmark's routing sends "
                        "every token to top_k real experts, so it would not measure them; drop one")
    if target is not None:
        if nulls < 1 or moe.router_bias_update_rate <= 0:
            problems.append("--null_expert_target_real_k is the compute target of the null experts' bias: it needs "
                            "--num_null_experts >= 1 and --router_bias_update_rate > 0 (the bias's step, e.g. 1e-3)")
        elif not max(0, moe.top_k - nulls) <= target < moe.top_k or target <= 0:
            problems.append(f"null_expert_target_real_k ({target}) must be in [{max(0, moe.top_k - nulls)}, "
                            f"{moe.top_k}) and > 0: a token takes top_k {moe.top_k} routes, at most {nulls} of them "
                            "to null experts")
        if p is not None:
            problems.append("--null_expert_target_real_k with --top_p: the controller's target is a share of top_k "
                            "routes per token, which top-p does not take; drop one")
    if p is None:
        if moe.min_k != MoEConfig.min_k:
            problems.append(f"min_k ({moe.min_k}) is only used by --top_p: add --top_p or drop --min_k")
        return problems
    if not 0 < p <= 1:
        problems.append(f"top_p ({p}) must be in (0, 1]")
    if not 1 <= moe.min_k <= moe.top_k:
        problems.append(f"min_k ({moe.min_k}) must be between 1 and top_k ({moe.top_k}), the most experts a token "
                        "takes under --top_p")
    if moe.score_function != "softmax":
        problems.append(f"--top_p with --score_function {moe.score_function}: top-p sums probabilities, which "
                        "sigmoid scores are not; use --score_function softmax")
    if moe.aux_loss_type != "micro_batch":
        problems.append(f"--top_p with --aux_loss_type {moe.aux_loss_type}: a token's routes vary in number, which "
                        "only the micro_batch balance loss counts here; use --aux_loss_type micro_batch")
    return problems


def group_problems(moe: MoEConfig) -> list[str]:
    """--expert_groups and --max_groups_per_token: equal groups of at least 2 experts (a group scores by its two best),
    a limit between 1 and the groups, and room inside the kept groups for top_k experts."""
    groups, keep, problems = moe.expert_groups, moe.max_groups_per_token, []
    if groups < 1:
        return [f"expert_groups ({groups}) must be >= 1"]
    if keep is not None and not 1 <= keep <= groups:
        problems.append(f"max_groups_per_token ({keep}) must be between 1 and expert_groups ({groups})")
    if keep is not None and groups == 1:
        problems.append("--max_groups_per_token needs --expert_groups > 1 (the groups to choose among)")
    for count in sorted(set(expert_counts(moe))) if groups > 1 else []:
        if count % groups or count // groups < 2:
            problems.append(f"expert_groups {groups} with {count} experts: each group needs the same number of "
                            "experts, at least 2 (a group scores by its two best); choose a divisor of the experts")
        elif keep is not None and moe.top_k > keep * (count // groups):
            problems.append(f"top_k {moe.top_k} > max_groups_per_token {keep} x {count // groups} experts per group: "
                            "raise --max_groups_per_token")
    return problems


def upcycling_problems(moe: MoEConfig, counts: list[int]) -> list[str]:
    """Problems in the settings of --expert_init granular (granularity) and drop (reinit_ratio); the FFN width is
    checked against the granularity once the model is known (moe/upcycling.py)."""
    problems = too_small(moe, ("granularity",))
    if not 0 <= moe.reinit_ratio <= 1:
        problems.append(f"reinit_ratio ({moe.reinit_ratio}) must be in [0, 1]: the fraction of each expert's hidden "
                        "units that --expert_init drop re-draws")
    if moe.granularity != 1 and moe.expert_init != "granular":
        problems.append(f"granularity ({moe.granularity}) is only used by --expert_init granular (this run has "
                        f"--expert_init {moe.expert_init}): add --expert_init granular or drop --granularity")
    if moe.reinit_ratio != MoEConfig.reinit_ratio and moe.expert_init != "drop":
        problems.append(f"reinit_ratio ({moe.reinit_ratio}) is only used by --expert_init drop (this run has "
                        f"--expert_init {moe.expert_init}): add --expert_init drop or drop --reinit_ratio")
    if moe.expert_init == "granular" and moe.granularity >= 1 and moe.num_shared_experts % moe.granularity:
        problems.append(f"num_shared_experts ({moe.num_shared_experts}) must be a multiple of granularity "
                        f"({moe.granularity}) for --expert_init granular: a shared expert is as wide as a routed one "
                        f"(1/{moe.granularity} of the dense FFN), and they start as whole copies of the dense FFN")
    if moe.expert_init == "granular" and moe.granularity >= 1:
        problems += [f"num_experts ({count}) must be a multiple of granularity ({moe.granularity}) for --expert_init "
                     f"granular: each group of {moe.granularity} experts holds the dense FFN's {moe.granularity} "
                     f"slices once; pick num_experts as a multiple of {moe.granularity}"
                     for count in counts if count >= 1 and count % moe.granularity]
    return problems
