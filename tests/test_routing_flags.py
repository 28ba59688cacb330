"""A routing setting is declared once (run/config.py's ``_routing_flag``); everything else follows from the mark: the
resume check and the routing a resume inherits, --allow_routing_change's help, the scoring fields of the router, and
export's rule for each flag. Each test fails when a routing flag is missing from one of them."""

import dataclasses

import pytest

from moe_models.hf.configs import NotRepresentable, hf_moe_config
from moe_models.hf.export_fidelity import EXPORT_OF_ROUTING_FLAG, training_differences
from moe_models.models.source import preset_config
from moe_models.moe.router import Scoring
from moe_models.run.cli import parse_args
from moe_models.run.config import ROUTING_FLAGS, MoEConfig, TrainConfig
from moe_models.run.moe_layout import MoELayout

# Written out here, not read from the code: the settings that decide a token's experts and their weights.
EXPECTED = {"score_function", "norm_topk_prob", "routed_scaling_factor", "router_bias_update_rate", "drop_tokens",
            "capacity_factor", "eval_capacity_factor", "min_capacity", "noisy_gate_policy", "use_rts",
            "top2_2nd_expert_sampling", "benchmark_balanced_routing", "expert_groups", "max_groups_per_token",
            "null_expert_target_real_k", "top_p", "min_k"}

# A setting of each routing flag that changes routing, with what it needs beside it, for export's rule.
CHANGED = {
    "score_function": dict(score_function="sigmoid", top_k=1), "norm_topk_prob": dict(norm_topk_prob=False),
    "routed_scaling_factor": dict(routed_scaling_factor=2.0),
    "router_bias_update_rate": dict(router_bias_update_rate=1e-3),
    "expert_groups": dict(expert_groups=4, max_groups_per_token=2),
    "max_groups_per_token": dict(expert_groups=4, max_groups_per_token=2),
    "null_expert_target_real_k": dict(num_null_experts=2, null_expert_target_real_k=1.5),
    "top_p": dict(top_p=0.5), "min_k": dict(top_p=0.5, min_k=2),
    "drop_tokens": dict(drop_tokens=True), "capacity_factor": dict(drop_tokens=True, capacity_factor=0.5),
    "eval_capacity_factor": dict(drop_tokens=True, eval_capacity_factor=0.5),
    "min_capacity": dict(drop_tokens=True, min_capacity=1),
    "top2_2nd_expert_sampling": dict(top2_2nd_expert_sampling=True),
    "benchmark_balanced_routing": dict(benchmark_balanced_routing=True),
    "noisy_gate_policy": dict(noisy_gate_policy="Jitter"), "use_rts": dict(use_rts=False),
}


def test_the_routing_flags_are_the_marked_fields():
    assert set(ROUTING_FLAGS) == EXPECTED


def test_allow_routing_changes_help_names_every_routing_flag():
    help_text = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == "allow_routing_change")
    assert all(name in help_text for name in ROUTING_FLAGS)


def test_the_scoring_fields_carry_their_flags_names_and_values():
    """Every router option beyond DeepSpeed's gate is a MoEConfig flag of the same name, and takes its value."""
    moe = MoEConfig(score_function="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                    router_bias_update_rate=1e-3, expert_groups=4, max_groups_per_token=2, num_null_experts=2,
                    null_expert_target_real_k=1.5, null_expert_output="identity", aux_loss_type="sequence")
    scoring = Scoring.of(moe)
    for f in dataclasses.fields(Scoring):
        assert getattr(scoring, f.name) == getattr(moe, f.name), f.name
    assert Scoring.of(MoEConfig()) == Scoring()  # every option at its default: DeepSpeed's gate


def test_every_routing_flag_has_an_export_rule_that_holds():
    assert set(EXPORT_OF_ROUTING_FLAG) == set(ROUTING_FLAGS)
    dense = preset_config("tiny-llama")  # exported as Mixtral with every routing flag at its default
    for flag, rule in EXPORT_OF_ROUTING_FLAG.items():
        moe = MoEConfig(**CHANGED[flag])
        try:  # "router": refused, or exported to another class whose router computes it (sigmoid: GLM4-MoE)
            routes_otherwise = hf_moe_config(dense, moe, MoELayout.resolve(moe, dense.num_hidden_layers)).model_type \
                != "mixtral"
        except NotRepresentable:
            routes_otherwise = True
        noted = bool(training_differences(moe))
        assert (routes_otherwise, noted) == {"router": (True, False), "trained otherwise": (False, True),
                                             "training only": (False, False)}[rule], flag


@pytest.mark.parametrize("flag", sorted(EXPECTED))
def test_each_routing_flag_parses_from_the_command_line(flag):
    """Each is a flag of train.py's command line under its own name."""
    value = CHANGED[flag][flag]
    cfg = parse_args(["--" + flag, str(value).lower() if isinstance(value, bool) else str(value)])
    assert getattr(cfg.moe, flag) == value
