"""Whether a run's checkpoints will export exactly: what export cannot hold (hf/configs.export_problems) and how
the trained routing differs from the exported HF model's (dropless, deterministic top-k), as the export's notes and
as the one line train.py prints at the start of a run."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..moe.router import Scoring
from ..run.config import MoEConfig
from ..run.moe_layout import MoELayout
from .configs import MOE_CLASSES, export_model_type, export_problems


# How export treats each routing flag (run/config.py marks them; tests/hf/test_export_fidelity.py checks that every one
# has an entry and that each rule holds):
# - "router": the HF class's router must compute it exactly, or export refuses (hf/configs.py, _routing_problems);
# - "trained otherwise": the run routed otherwise than the exported HF model will, noted (training_differences);
# - "training only": it acts in training forwards only; DeepSpeed's eval routing, which the HF model's equals,
#   ignores it.
EXPORT_OF_ROUTING_FLAG = {
    "score_function": "router", "norm_topk_prob": "router", "routed_scaling_factor": "router",
    "router_bias_update_rate": "router", "expert_groups": "router", "max_groups_per_token": "router",
    "null_expert_target_real_k": "router", "top_p": "router", "min_k": "router",
    "drop_tokens": "trained otherwise", "capacity_factor": "trained otherwise",
    "eval_capacity_factor": "trained otherwise",
    "min_capacity": "trained otherwise", "top2_2nd_expert_sampling": "trained otherwise",
    "benchmark_balanced_routing": "trained otherwise",
    "noisy_gate_policy": "training only", "use_rts": "training only",
}


def training_differences(moe: MoEConfig) -> list[tuple[str, str, str]]:
    """How the trained DeepSpeed model's routing differs from the exported (dropless, deterministic) HF model's: for
    each, the export's note, a short form, and the flag that removes it."""
    found = []
    if moe.drop_tokens:
        found.append((f"the run dropped tokens above expert capacity (drop_tokens true, capacity_factor "
                      f"{moe.capacity_factor}, eval_capacity_factor {moe.eval_capacity_factor}); the HF model routes "
                      "every token, so the two agree on a batch only where DeepSpeed dropped none",
                      "drops tokens above expert capacity", "--drop_tokens false"))
    if moe.top_k == 2 and moe.top2_2nd_expert_sampling and Scoring.of(moe).is_deepspeed:
        found.append(("the run picked the second expert with Gumbel noise (top2_2nd_expert_sampling true, which "
                      "DeepSpeed applies in eval too); the HF model takes the two highest-scoring experts, as "
                      "DeepSpeed does with top2_2nd_expert_sampling false",
                      "picks the second expert with Gumbel noise", "--top2_2nd_expert_sampling false"))
    if moe.benchmark_balanced_routing:
        found.append(("the run spread every token evenly over the experts (benchmark_balanced_routing true), whatever "
                      "the router scored; the HF model routes by the router's scores, which did not learn to route",
                      "spreads tokens evenly, ignoring the router", "--benchmark_balanced_routing false"))
    return found


def differences_in_training(moe: MoEConfig) -> list[str]:
    """The export's notes: how the trained DeepSpeed model's routing differed from the exported HF model's."""
    return [note for note, _, _ in training_differences(moe)]


def export_outlook(dense: PretrainedConfig, moe: MoEConfig, layout: MoELayout) -> str | None:
    """At the start of a run, one line when its checkpoints will not export exactly (the export's own checks:
    export_problems, training_differences), with what would make them; None when they will."""
    if layout.is_dense:
        return None
    problems = export_problems(dense, moe, layout)
    if problems:
        return f"this run's checkpoints cannot be exported to a native HF MoE class: {'; '.join(problems)}"
    differences = training_differences(moe)
    if not differences:
        return None
    target = MOE_CLASSES[export_model_type(dense, moe)].name
    return (f"this run's checkpoints will export to {target} inexactly ({target} routes every token, to the top-k "
            f"scores; this run {' and '.join(d[1] for d in differences)}): {' '.join(d[2] for d in differences)} "
            "would make the export exact (docs/export.md)")
