"""The benchmarks in bench/ still start: every script parses its arguments (imports included) and prints its help; and
the figures a benchmark compares with are right (bench/in_place_memory.py: the weights a rank holds)."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from helpers import REPO, child_env


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")
                                           if not p.name.startswith("_")))  # _*.py: shared by the scripts
def test_benchmark_script_starts(script):
    result = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_in_place_memory_bench_expects_what_a_rank_of_ep2_holds(tmp_path, layout):
    """The plan's weights per rank that bench/in_place_memory.py prints beside its figures (non-expert parameters +
    half the experts) are the bytes a rank of ep_size 2 holds after the in-place read, in either layout, and less
    than a whole model: the rank read only its experts."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from moe_models.hf.in_place_load import load_in_place
    from moe_models.run.cli import parse_args

    torch.manual_seed(0)
    config = DeepseekV3Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
                              num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                              kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=64)
    whole = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    whole.save_pretrained(tmp_path, save_original_format=layout == "per_expert")
    held = sum(p.numel() * p.element_size() for p in load_in_place(tmp_path, 2, 0, torch.bfloat16).parameters())
    experts = sum(p.numel() for name, p in whole.named_parameters() if name.endswith(("experts.gate_up_proj",
                                                                                      "experts.down_proj")))
    assert held == (sum(p.numel() for p in whole.parameters()) - experts / 2) * 2
    cfg = parse_args(["--model_name_or_path", str(tmp_path), "--ep_size", "2"])
    assert bench_module("in_place_memory").planned_weights(cfg, world_size=2) == held


def test_shaped_link_table_pairs_the_runs_and_sets_bytes_against_the_plan():
    """bench/shaped_link.py's table: each dispatcher's median step and the plan's two predictions, the median, lowest
    and highest node_once / per_route ratio of the runs taken in pairs beside the plans' ratios, and the bytes across
    nodes a run counted against the plan's."""
    runs = {"per_route": [(2.0, 8e6), (3.0, 8e6), (2.2, 8e6)], "node_once": [(1.0, 2e6), (1.8, 2e6), (1.2, 3e6)]}
    result = {"rate": "200mbit", "model": "E32 top-8", "routing": "M=1",
              "plan": {"per_route": {"step_time": 2.5, "across_nodes": 1e7},
                       "node_once": {"step_time": 1.0, "across_nodes": 2e6}},
              "plan_idle": {"per_route": {"step_time": 2.0}, "node_once": {"step_time": 0.5}},
              **{d: [{"step_time": t, "across_nodes": b} for t, b in pairs] for d, pairs in runs.items()}}
    header, rule, line = bench_module("shaped_link").table([result]).splitlines()
    assert header.count("|") == rule.count("|") == line.count("|") == 8
    # ratios per pair 0.5, 0.6, 0.545...: median 0.55; plans 1.0 / 2.5 and 0.5 / 2.0
    assert line == ("| 200mbit | E32 top-8 | M=1 | 2200, 2500, 2000 | 1200, 1000, 500 | 0.55 [0.50-0.60], 0.40, 0.25 "
                    "| 8.00 (0.80), 2.33 (1.17) |")


def test_shaped_link_merges_the_runs_of_one_configuration():
    """--tabulate over several results files: one row per configuration, its runs from every file, in order."""
    def result(rate, times):
        return {"rate": rate, "model": "E8 top-2", "routing": "", "plan": {},
                **{d: [{"step_time": t} for t in times] for d in ("per_route", "node_once")}}
    rows = bench_module("shaped_link").merged([result("1gbit", [1.0]), result("200mbit", [2.0]),
                                                result("1gbit", [3.0, 4.0])])
    assert [(row["rate"], [r["step_time"] for r in row["node_once"]]) for row in rows] == \
        [("1gbit", [1.0, 3.0, 4.0]), ("200mbit", [2.0])]
