"""The plan's step-time model (training/step_time.py) against the formulas written out by hand, the layout search, and
the plan command for a cluster of 16 ranks made from one process."""

import json

import pytest

import train
from moe_models.moe.dispatcher import AllToAllDispatcher
from moe_models.run.config import ConfigError
from moe_models.training.clusters import PRESETS, Cluster, resolve_cluster
from moe_models.training.layout_search import layouts, search, why_best
from moe_models.training.preflight import GIB, ModelShape, Setup, bytes_per_rank
from moe_models.training.step_time import all_to_all_split, predict

SHAPE = ModelShape(dense_parameters=1_000_000, expert_parameters=8_000_000, active_parameters=2_000_000,
                   flops_per_token=1e7, num_layers=4, hidden_size=64, vocab_size=257, moe_layers=2, routes=4,
                   routed_units=512, always_on_units=512, router_outputs=16)
CLUSTER = Cluster(name="hand", devices_per_node=4, memory_gib=80, peak_flops=2e12, matmul_flops=1e12,
                  memory_bandwidth=1e11, intra_node_bandwidth=1e10, intra_node_latency=1e-5,
                  inter_node_bandwidth=1e9, inter_node_latency=1e-4)


def setup(**changes) -> Setup:
    values = dict(world_size=8, ep_size=8, zero_stage=1, bf16=False, offload_optimizer=False, micro_batch=2,
                  block_size=64, gradient_accumulation_steps=2, activation_checkpointing=False)
    return Setup(**{**values, **changes})


def test_two_nodes_ep_across_them_by_hand():
    step = predict(SHAPE, setup(), {}, CLUSTER, all_to_all_bytes=8e6)
    tokens = 2 * 64 * 2
    assert step.compute == pytest.approx(tokens * 1e7 / 1e12)
    # ep_size 8 on nodes of 4: 3 peers in the node, 4 across; 8e6 / 7 bytes to each; the network is the slower part.
    # Per MoE layer 3 exchanges forward (counts, dispatch, combine) and 2 backward, x 2 layers x 2 micro-batches,
    # each with the cross-node latency.
    assert step.all_to_all == pytest.approx(max(8e6 / 7 * 3 / 1e10, 8e6 / 7 * 4 / 1e9) + 20 * 1e-4)
    # Dense gradients (fp32) over the 8 ranks of 2 nodes by the network; the experts' group has one rank (W / P = 1).
    assert step.gradients == pytest.approx(2 * 7 / 8 * 1e6 * 4 / 1e9 + 2 * 7 * 1e-4)
    # ZeRO 1: Adam over this rank's partition of the dense parameters and of its experts (8e6 / 8 over 1 rank), and
    # the engine's pass over every local gradient and weight (16 bytes each).
    assert step.optimizer == pytest.approx(((1e6 / 8 + 8e6 / 8) * 32 + (1e6 + 8e6 / 8) * 16) / 1e11)
    total = step.compute + step.all_to_all + step.gradients + step.optimizer
    assert step.total == pytest.approx(total)
    assert step.tokens_per_sec == pytest.approx(tokens * 8 / total)
    assert step.mfu == pytest.approx(tokens * 8 / total * 1e7 / (8 * 2e12))
    assert sum(step.shares().values()) == pytest.approx(1.0)


def test_one_node_bf16_checkpointing_and_overlap_by_hand():
    s = setup(world_size=4, ep_size=2, zero_stage=2, bf16=True, activation_checkpointing=True)
    step = predict(SHAPE, s, {"zero_optimization": {"overlap_comm": True}}, CLUSTER, all_to_all_bytes=4e6)
    tokens = 2 * 64 * 2
    forward = tokens * 1e7 / 3 / 1e12
    assert step.compute == pytest.approx(4 * forward)  # a recompute is one more forward
    # The one peer is in the node; the recompute's forward exchanges again: (3 + 3 + 2) x 2 layers x 2 micro-batches.
    assert step.all_to_all == pytest.approx(4e6 / 1e10 + (3 + 3 + 2) * 2 * 2 * 1e-5)
    dense = 2 * 3 / 4 * 1e6 * 2 / 1e10 + 2 * 3 * 1e-5          # bf16 gradients over 4 ranks, NVLink
    experts = 2 * 1 / 2 * 8e6 / 2 * 2 / 1e10 + 2 * 1 * 1e-5    # each expert over its 2-rank data-parallel group
    reduction = (dense + experts) / 2                            # the half that overlaps the backward...
    assert step.gradients == pytest.approx(reduction + max(0.0, reduction - 3 * forward))  # ...fully hidden here
    assert step.optimizer == pytest.approx(((1e6 / 4 + 8e6 / 2 / 2) * 32 + (1e6 + 8e6 / 2) * 16) / 1e11)


def test_node_once_two_levels_one_after_the_other_by_hand():
    step = predict(SHAPE, setup(dispatcher="node_once"), {}, CLUSTER, all_to_all_bytes=5e6, split=(3e6, 2e6))
    # across at the network's rate, then in the node at NVLink's; per layer 4 exchanges across and 3 inside forward,
    # 3 and 2 backward, x 2 layers x 2 micro-batches
    assert step.all_to_all == pytest.approx(2e6 / 1e9 + 7 * 4 * 1e-4 + 3e6 / 1e10 + 5 * 4 * 1e-5)
    # nothing across (one node): the per-route model
    inside = predict(SHAPE, setup(dispatcher="node_once", ep_size=4), {}, CLUSTER, 3e6, split=(3e6, 0.0))
    assert inside.all_to_all == predict(SHAPE, setup(ep_size=4), {}, CLUSTER, 3e6).all_to_all


def test_no_all_to_all_at_ep_size_1_and_no_prediction_with_offload():
    assert predict(SHAPE, setup(ep_size=1), {}, CLUSTER, all_to_all_bytes=0.0).all_to_all == 0.0
    assert predict(SHAPE, setup(offload_optimizer=True), {}, CLUSTER, all_to_all_bytes=8e6) is None


def test_the_search_keeps_the_tokens_per_step_and_ranks_what_fits():
    base = setup(micro_batch=4, gradient_accumulation_steps=1)
    every = layouts(SHAPE, base, num_experts=8)
    assert {s.micro_batch * s.gradient_accumulation_steps for s in every} == {4}
    assert {s.ep_size for s in every} == {1, 2, 4, 8} and {s.zero_stage for s in every} == {0, 1, 2}
    # A memory limit that only checkpointing or smaller micro-batches meet at ZeRO 0 / ep_size 1.
    limit = bytes_per_rank(SHAPE, base)["total"] / GIB * 0.999
    ranked = search(SHAPE, base, {}, CLUSTER, 8, limit)
    assert ranked and all(layout.memory_gib <= limit for layout in ranked)
    speeds = [layout.step.tokens_per_sec for layout in ranked]
    assert speeds == sorted(speeds, reverse=True)
    assert len(ranked) < len(every)  # some did not fit
    reason = why_best([layout.as_dict() for layout in ranked])
    different = next(layout for layout in ranked if layout.step.tokens_per_sec < speeds[0] * (1 - 1e-9))
    assert f"{100 * (speeds[0] / different.step.tokens_per_sec - 1):.1f}% more tokens/s than the next " \
           f"({different.flags()})" in reason


def test_plan_for_two_nodes_of_eight_from_one_process(world, tmp_path, capsys):
    train.main(["--num_experts", "16", "--ep_size", "8", "--block_size", "32", "--plan", "--plan_cluster",
                "h100-sxm-ib400", "--plan_nodes", "2", "--plan_search", "--output_dir", str(tmp_path)])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["setup"]["world_size"] == 16 and plan["setup"]["bf16"]  # "auto" is the cluster's bf16
    assert plan["step_time"]["step_time"] > 0 and 0 < plan["step_time"]["mfu"] < 1
    assert plan["search"][0]["tokens_per_sec"] >= plan["step_time"]["tokens_per_sec"]
    shown = capsys.readouterr().out
    assert "predicted on h100-sxm-ib400 (2 nodes x 8)" in shown and "best:" in shown
    # the search's best is the header's answer, and the command that launches it: the plan's flags without its own,
    # the layout's in place of the --ep_size given
    best = plan["search"][0]["flags"]
    assert f"fits 80 GiB: yes; the fastest layout that fits (--plan_search, below): {best}\n" in shown
    assert "smallest change" not in shown
    command = f"deepspeed --hostfile HOSTFILE train.py --block_size 32 --num_experts 16 --output_dir {tmp_path} {best}"
    assert plan["launch_command"] == command and f"launch the fastest layout: {command}\n" in shown
    assert "HOSTFILE: 2 lines 'HOSTNAME slots=8', one per node" in shown


def test_the_launch_command_of_one_node_and_of_a_flag_of_each_kind():
    from moe_models.run.cli import parse_args
    from moe_models.training.layout_search import launch_command
    cfg = parse_args(["--num_experts", "8", "--disable_tqdm", "--moe_layers", "0,2", "--train_file", "my data.txt",
                      "--gradient_checkpointing", "--deepspeed", "zero2", "--plan", "--plan_cluster", "h100-sxm-ib400",
                      "--plan_search", "--device_memory_gb", "40"])
    best = {"flags": "--ep_size 4 --deepspeed zero1 --per_device_train_batch_size 2 --gradient_accumulation_steps 4"}
    assert launch_command(cfg, best, world_size=8, devices_per_node=8) == (
        "deepspeed --num_gpus 8 train.py --train_file 'my data.txt' --num_experts 8 --moe_layers 0,2 --disable_tqdm "
        "--ep_size 4 --deepspeed zero1 --per_device_train_batch_size 2 --gradient_accumulation_steps 4")


def test_adaptive_compute_plans_at_most_top_k_and_predicts_at_the_compute_target(world, tmp_path, capsys):
    from moe_models.models.source import resolve_model_config
    from moe_models.run.cli import parse_args
    common = ["--num_experts", "8", "--block_size", "32", "--plan", "--plan_cluster", "h100-sxm-ib400",
              "--num_null_experts", "4", "--router_bias_update_rate", "1e-3"]
    bound = train.main([*common, "--output_dir", str(tmp_path / "bound")])
    assert "no compute target (--null_expert_target_real_k): the predicted compute counts the bound" in \
        capsys.readouterr().out
    target = train.main([*common, "--null_expert_target_real_k", "1.5", "--output_dir", str(tmp_path / "target")])
    shown = capsys.readouterr().out
    config = resolve_model_config(parse_args(common).model)
    route = 6 * 3 * config.hidden_size * config.intermediate_size  # one SwiGLU expert's training FLOPs per token
    adaptive = target["adaptive_compute"]
    assert adaptive["expert_flops_per_token_at_most"] == config.num_hidden_layers * 2 * route  # top-2 in every block
    predicted = target["flops_per_token"] - (2 - 1.5) * config.num_hidden_layers * route
    assert adaptive["predicted_flops_per_token"] == pytest.approx(predicted)
    assert target["flops_per_token"] == bound["flops_per_token"]  # the planned figure is the bound
    compute = target["step_time"]["seconds"]["compute"] / bound["step_time"]["seconds"]["compute"]
    assert compute == pytest.approx(predicted / bound["flops_per_token"])
    assert "predicted compute uses the compute target, 1.5 real experts per token" in shown
    assert "at most 2 real experts per token and MoE layer" in shown


def test_cluster_files_and_refusals(world, tmp_path, capsys):
    own = tmp_path / "mine.json"
    fields = {k: v for k, v in PRESETS["h100-sxm-ib400"].__dict__.items() if k != "name"}
    own.write_text(json.dumps({**fields, "devices_per_node": 4}))
    assert resolve_cluster(str(own)).devices_per_node == 4 and resolve_cluster(str(own)).name == "mine"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"devices_per_node": 4, "speed": 1}))
    with pytest.raises(ConfigError, match="missing .*matmul_flops.*unknown speed"):
        resolve_cluster(str(bad))
    for flags, message in [(["--plan", "--plan_search"], "--plan_search needs --plan_cluster"),
                           (["--plan_cluster", "h100-sxm-ib400"], "only apply with --plan"),
                           (["--plan", "--plan_cluster", "tpu-pod"], "neither a preset"),
                           (["--plan", "--plan_cluster", "h100-sxm-ib400", "--plan_nodes", "0"], "must be >= 1")]:
        with pytest.raises(SystemExit):
            train.main([*flags, "--output_dir", str(tmp_path / "out")])
        assert message in capsys.readouterr().err, flags
        assert not (tmp_path / "out").exists(), flags


def test_bytes_split_by_node_in_the_plan_and_in_the_dispatchers_count(world):
    # 8e6 bytes to 7 peers in equal parts; nodes of 4: 3 peers share the node, 4 are across
    assert all_to_all_split(8e6, 8, 4) == pytest.approx((8e6 / 7 * 3, 8e6 / 7 * 4))
    assert all_to_all_split(8e6, 1, 4) == (0.0, 0.0)
    dispatcher = AllToAllDispatcher(num_local_experts=1, ep_size=4)
    dispatcher._same_node = [True, True, False, False]  # this rank (0 of the group) and peer 1 on one node
    dispatcher._count_sent(send_splits=[5, 1, 2, 3], recv_splits=[5, 4, 0, 1], row_bytes=10)
    # forward and backward: each peer gets its routes and the outputs of its routes, and their gradients back
    assert dispatcher.take_sent_bytes() == (2 * (1 + 4) * 10, 2 * ((2 + 0) + (3 + 1)) * 10)
    assert dispatcher.take_sent_bytes() == (0, 0)
