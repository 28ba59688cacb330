"""--benchmark_balanced_routing: token t's routes go to experts (t k + j) mod E, the weights are the router's
probabilities there, the router still gets gradients; marked in the metrics; refused where it cannot work."""

import json

import pytest
import torch
from helpers import launch

import train
from moe_models.moe.layer import MoEFeedForward
from moe_models.run.cli import parse_args
from moe_models.run.config import MoEConfig
from moe_models.training.preflight import plan
from moe_models.training.validate import validate


def layer(top_k: int) -> MoEFeedForward:
    cfg = MoEConfig(num_experts=4, top_k=top_k, drop_tokens=False, benchmark_balanced_routing=True)
    return MoEFeedForward(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)),
                          hidden_size=8, num_experts=4, cfg=cfg).train()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routes_go_round_robin_with_the_routers_probabilities(world, top_k):
    moe = layer(top_k)
    x = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(0))
    moe(x)
    routes = moe.routing  # the counters saw the forced routes
    ids = moe.last_topk_ids_TK
    expected = [[(t * top_k + j) % 4 for j in range(top_k)] for t in range(10)]
    assert ids.tolist() == expected
    loads = [sum(row.count(e) for row in expected) for e in range(4)]
    assert max(loads) - min(loads) <= 1
    assert routes.sums(torch.device("cpu")).chosen_E.tolist() == loads
    logits = x.reshape(10, 8) @ moe.router.wg.weight.t()
    probs = torch.softmax(logits, dim=1).gather(1, torch.tensor(expected))
    weights = probs / probs.sum(dim=1, keepdim=True) if top_k > 1 else probs
    assert torch.allclose(moe.router.route(x.reshape(10, 8)).weights_TK, weights, atol=1e-6)


def test_the_router_still_learns_from_the_weights(world):
    moe = layer(2)
    out = moe(torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(1)))
    out.square().sum().backward()
    assert moe.router.wg.weight.grad is not None and moe.router.wg.weight.grad.abs().sum() > 0


def test_a_run_is_marked_and_refused_where_it_cannot_work(world, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--num_experts", "4", "--drop_tokens", "false", "--benchmark_balanced_routing", "--max_steps", "2",
                "--logging_steps", "1", "--eval_steps", "0", "--synthetic_examples", "200", "--block_size", "32",
                "--per_device_train_batch_size", "2", "--disable_tqdm", "--output_dir", str(out)])
    assert "Benchmark routing" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["moe"]["benchmark_balanced_routing"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    assert train_rows and all(row["moe/layer_0/forced_balanced_routing"] for row in train_rows)
    assert all(row["moe/layer_0/max_violation_step"] <= 4 / (2 * 32 * 2 * 2) + 1e-9 for row in train_rows)
    for flags in (["--moe_impl", "deepspeed", "--drop_tokens", "false"], ["--drop_tokens", "true"]):
        with pytest.raises(SystemExit):
            train.main(["--benchmark_balanced_routing", *flags, "--output_dir", str(tmp_path / "refused")])
        assert "--benchmark_balanced_routing needs" in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


@pytest.mark.distributed
def test_at_ep_size_2_every_expert_gets_an_even_share_and_the_plan_counts_the_bytes_sent(tmp_path):
    """Even routing is what the plan assumes: the bytes each rank's dispatcher counts (from its split sizes, forward
    and backward, with the recompute of activation checkpointing) equal the plan's all-to-all bytes."""
    out = tmp_path / "ep2"
    flags = ["--ep_size", "2", "--num_experts", "4", "--drop_tokens", "false", "--benchmark_balanced_routing",
             "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "0", "--synthetic_examples", "200",
             "--block_size", "32", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
             "--gradient_checkpointing", "--warmup_steps", "1", "--disable_tqdm"]
    launch(["train.py", *flags, "--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    cfg = parse_args([*flags, "--output_dir", str(tmp_path / "plan")])
    planned = plan(cfg, validate(cfg, world_size=2), 2)["all_to_all_bytes_per_step"]
    routes = 2 * 2 * 2 * 32 * 2  # ranks x micro-batches x sequences x block x top-2, per step
    for row in rows:
        for i in range(4):
            assert row[f"moe/layer_{i}/routed_per_expert"] == [routes // 4] * 4
            assert row[f"moe/layer_{i}/max_violation_step"] == 0.0
            assert row[f"moe/layer_{i}/forced_balanced_routing"] is True
            assert row[f"moe/layer_{i}/all_to_all_bytes_across_nodes"] == 0  # one node
        assert sum(row[f"moe/layer_{i}/all_to_all_bytes_in_node"] for i in range(4)) == pytest.approx(planned)
