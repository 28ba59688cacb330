"""Expert + data parallelism through the real deepspeed launcher, on 2 CPU ranks (gloo).

Every test starts `python -m deepspeed.launcher.runner` (the module behind the `deepspeed` command),
has a timeout, and on failure or hang shows the ranks' output.
"""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import LAUNCHER, REPO, finish, free_port, launch, launch_env, logged_rows, start, succeed

import train

pytestmark = pytest.mark.distributed

# Small and fast, deterministic routing (no random token selection, no sampled second expert).
PROBE_FLAGS = ["--num_experts", "4", "--top_k", "2", "--use_rts", "false", "--top2_2nd_expert_sampling", "false",
               "--expert_init", "random", "--synthetic_examples", "2000", "--block_size", "64",
               "--per_device_train_batch_size", "4", "--max_steps", "10", "--warmup_steps", "1",
               "--learning_rate", "3e-3", "--deepspeed", "zero2", "--disable_tqdm"]


def probe(output_dir: Path, ep_size: int, *flags: str) -> list[dict]:
    launch(["tests/scripts/probe.py", "--steps", "3", "--ep_size", str(ep_size), "--output_dir", str(output_dir),
            *PROBE_FLAGS, *flags])
    return [torch.load(output_dir / f"probe_rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    """The same run (seed, data, world size 2) at ep_size 1 and ep_size 2."""
    root = tmp_path_factory.mktemp("ep")
    return {ep: (root / f"ep{ep}", probe(root / f"ep{ep}", ep)) for ep in (1, 2)}


def merged(records: list[dict], key: str) -> dict:
    """One dict over global expert ids from the ranks' shares (ranks holding the same expert must agree)."""
    result = {}
    for record in records:
        for name, tensor in record[key].items():
            if name in result:
                torch.testing.assert_close(tensor, result[name], rtol=0, atol=0)
            result[name] = tensor
    return result


def test_expert_init_depends_on_global_expert_id_not_on_rank(ep_runs):
    ep1, ep2 = merged(ep_runs[1][1], "initial"), merged(ep_runs[2][1], "initial")
    assert set(ep1) == set(ep2) and {gid for _, gid, _ in ep1} == {0, 1, 2, 3}
    for name in ep1:
        torch.testing.assert_close(ep2[name], ep1[name], rtol=0, atol=0)
    # each ep=2 rank holds a different half of the experts
    halves = [{gid for _, gid, _ in record["initial"]} for record in ep_runs[2][1]]
    assert halves == [{0, 1}, {2, 3}]


def test_ep2_losses_and_gradients_equal_ep1(ep_runs):
    assert_same_run(ep_runs[1][1], ep_runs[2][1])


def test_host_syncs_of_a_step_at_ep1_and_ep2(ep_runs):
    """A training forward + backward reads nothing to the host at ep_size 1; at ep_size 2 the uneven all-to-all
    needs its split sizes on the host: one read per MoE layer and forward, none in the backward
    (docs/performance.md#host-syncs)."""
    for ep_size in (1, 2):
        for record in ep_runs[ep_size][1]:
            ours = [(op, where.split(":")[0]) for op, where, is_ours in record["host_syncs"] if is_ours]
            expected = [("tolist", "moe_models/moe/dispatcher.py")] * record["moe_layers"] if ep_size == 2 else []
            assert ours == expected, record["host_syncs"]
            assert all(where.startswith("torch/") for _, where, is_ours in record["host_syncs"] if not is_ours)


def test_shared_experts_at_ep2_equal_ep1_and_are_reduced_over_every_rank(tmp_path):
    """Upcycled shared experts with their gate, and the router z-loss: the same losses and gradients at ep_size 2 as
    at 1, and the shared experts being data-parallel parameters, the same gradient on both ranks (an
    expert-parallel one at ep_size 2 would be reduced over a group of one rank, and differ)."""
    flags = ("--num_shared_experts", "2", "--shared_expert_gate", "--expert_init", "copy_noise",
             "--router_z_loss_coef", "0.01")
    ep1, ep2 = (probe(tmp_path / f"ep{ep}", ep, *flags) for ep in (1, 2))
    assert_same_run(ep1, ep2)
    for run in (ep1, ep2):
        rank0, rank1 = (record["shared_grads"] for record in run)
        assert len(rank0) == 4 * 4 and set(rank1) == set(rank0)  # gate/up/down and the gate, in 4 layers
        for name in rank0:
            torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=f"shared grad {name}")
    assert sum(g.abs().sum() for g in ep1[0]["shared_grads"].values()) > 0
    for name, grad in ep1[0]["shared_grads"].items():
        torch.testing.assert_close(ep2[0]["shared_grads"][name], grad, rtol=1e-4, atol=1e-7, msg=f"shared {name}")


@pytest.mark.parametrize("init", [["--expert_init", "granular", "--granularity", "4", "--top_k", "4"],
                                  ["--expert_init", "drop", "--reinit_ratio", "0.25"]], ids=["granular", "drop"])
def test_granular_and_drop_upcycling_at_ep2_equal_ep1(init, tmp_path):
    """The same global experts (each by its global id, whatever rank holds it: with G = 4 rank 1 holds slices 2
    and 3), losses and gradients."""
    ep1, ep2 = (probe(tmp_path / f"ep{ep}", ep, *init) for ep in (1, 2))
    initial1, initial2 = merged(ep1, "initial"), merged(ep2, "initial")
    assert set(initial1) == set(initial2) and {gid for _, gid, _ in initial1} == {0, 1, 2, 3}
    for name in initial1:
        torch.testing.assert_close(initial2[name], initial1[name], rtol=0, atol=0)
    assert_same_run(ep1, ep2)


def assert_same_run(ep1: list[dict], ep2: list[dict]) -> None:
    """Losses of every step, expert and router gradients of the first step (two probe runs' records)."""
    losses1, losses2 = ep1[0]["losses"], ep2[0]["losses"]
    assert len(losses1) == 3
    assert losses2 == pytest.approx(losses1, rel=1e-5)
    grads1, grads2 = merged(ep1, "grads"), merged(ep2, "grads")
    assert set(grads1) == set(grads2)
    assert sum(g.abs().sum() for g in grads1.values()) > 0
    for name in grads1:
        torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-4, atol=1e-7, msg=f"expert grad {name}")
    for router1, router2 in zip(ep1[0]["router_grads"], ep2[0]["router_grads"]):
        torch.testing.assert_close(router2, router1, rtol=1e-4, atol=1e-7)
    for record in (*ep1, *ep2):  # each rank routes its batches' tokens that are not padding
        assert record["routed_tokens"] == record["real_tokens"]


# Conversations one per row (--packing false), padded: each rank routes a different number of real tokens.
PADDED_CHAT = ["--train_file", str(REPO / "examples" / "chat" / "conversations.jsonl"), "--chat_template",
               str(REPO / "examples" / "chat" / "chat.jinja"), "--packing", "false", "--block_size", "128"]


@pytest.mark.parametrize("drop_tokens, data", [("true", PADDED_CHAT), ("false", [])], ids=["capacity-chat", "dropless"])
def test_grouped_impl_at_ep2_equals_stock_at_ep1(drop_tokens, data, tmp_path):
    """Uneven all-to-all of the kept routes (capacity mode: those DeepSpeed's gate keeps; dropless: all). In
    capacity mode on padded conversations: the loss on the answers, and the padding neither routed nor in the
    capacity (moe/padding.py), whether the experts are on one rank or split over two."""
    stock = probe(tmp_path / "stock", 1, "--moe_impl", "deepspeed", "--drop_tokens", drop_tokens, *data)
    grouped = probe(tmp_path / "grouped", 2, "--moe_impl", "grouped", "--drop_tokens", drop_tokens, *data)
    assert_same_run(stock, grouped)
    if data:
        assert all(record["real_tokens"] < 3 * 4 * 128 for record in stock)  # 3 steps of 4 rows of 128: padding


def test_each_rank_holds_only_its_experts_and_checkpoints_hold_all(ep_runs):
    full = ep_runs[1][1][0]["parameters"]
    expert_params = sum(t.numel() for t in merged(ep_runs[1][1], "initial").values())  # all layers, all experts
    assert [r["parameters"] for r in ep_runs[2][1]] == [full - expert_params // 2] * 2
    for ep in (1, 2):
        step_dir = ep_runs[ep][0] / "checkpoints" / "global_step3"
        names = {p.name for p in step_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")}
        assert names == {f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
                         for layer in range(4) for expert in range(4)}


# Short train.py runs for the launch/ wrappers.
QUICK = ["--num_experts", "4", "--max_steps", "3", "--warmup_steps", "1", "--synthetic_examples", "1000",
         "--block_size", "64", "--per_device_train_batch_size", "4", "--max_eval_batches", "2", "--disable_tqdm"]


def expert_files(output_dir: Path, step: int) -> set[str]:
    return {p.name for p in (output_dir / "checkpoints" / f"global_step{step}").glob("layer_*_expert_*_*.pt")}


ALL_EXPERT_FILES = {f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
                    for layer in range(4) for expert in range(4)}


def test_world_mismatch_ends_in_one_clear_error(tmp_path):
    code, output = finish(start(["launch/single_node.sh", "2", "--ep_size", "4", *QUICK, "--output_dir",
                                 str(tmp_path / "run")], MASTER_PORT=str(free_port())), timeout=120)
    assert code != 0
    assert output.count("ep_size (4) must divide the number of ranks (2): use an ep_size that divides 2") == 1
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()


def test_two_nodes_without_ssh(tmp_path):
    """Two launchers on this machine acting as two nodes of 2 ranks each; ep_size 4 splits the experts across them,
    with the node-once dispatcher. With routes spread evenly (--benchmark_balanced_routing: token t on experts 2t and
    2t + 1 mod 4, both on one node), the bytes each rank's dispatcher counts inside its node and across nodes equal
    the plan's for 2 nodes of 2 devices: each token crosses to the other node for half the ranks, once, where the
    per-route dispatcher sends 2 rows. (The per-route counts across nodes: tests/moe/test_node_once.py.)"""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    port, out = str(free_port()), tmp_path / "run"
    flags = ["--ep_size", "4", *QUICK, "--benchmark_balanced_routing", "--logging_steps", "1",
             "--dispatcher", "node_once"]
    nodes = [start(["launch/multi_node_no_ssh.sh", str(hostfile), str(rank), "127.0.0.1", *flags, "--output_dir",
                    str(out)], MASTER_PORT=port) for rank in (0, 1)]
    outputs = [succeed(node) for node in nodes]
    assert "Done: 3 steps" in outputs[0]
    assert "nnodes=2, num_local_procs=2, node_rank=1" in outputs[1]
    assert expert_files(out, 3) == ALL_EXPERT_FILES
    assert json.loads((out / "run_config.json").read_text())["resolved"]["world_size"] == 4

    cluster = tmp_path / "two_per_node.json"
    cluster.write_text(json.dumps(dict(devices_per_node=2, memory_gib=16, peak_flops=1e12, matmul_flops=1e12,
                                       memory_bandwidth=1e10, intra_node_bandwidth=1e9, intra_node_latency=1e-5,
                                       inter_node_bandwidth=1e8, inter_node_latency=1e-4,
                                       bf16=False)))  # "auto" gives fp32 there, as in the run
    plan_dir = tmp_path / "plan"
    train.main([*flags, "--plan", "--plan_cluster", str(cluster), "--plan_nodes", "2", "--output_dir", str(plan_dir)])
    planned = json.loads((plan_dir / "plan.json").read_text())
    row_bytes, tokens = planned["shape"]["hidden_size"] * 4, 4 * 64  # fp32 rows, a micro-batch's tokens
    # per layer, forward and backward: half the ranks' tokens cross once (a row, 2 x 2 fp32 route values, the sum
    # back); inside the node half the routes go to the other rank and come back
    per_layer = (2 * tokens / 2 * (2 * row_bytes + 2 * 2 * 4), 2 * 2 * tokens * 2 / 2 * row_bytes)
    assert planned["all_to_all_bytes_across_nodes"] == pytest.approx(4 * per_layer[0])
    assert planned["all_to_all_bytes_in_node"] == pytest.approx(4 * per_layer[1])
    # per route, half of each rank's 2 x tokens routes cross, a row out and one back, forward and backward
    assert planned["all_to_all_bytes_across_nodes"] < 4 * 2 * 2 * tokens * row_bytes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) == 3
    for row in rows:
        for where in ("in_node", "across_nodes"):
            counted = sum(row[f"moe/layer_{i}/all_to_all_bytes_{where}"] for i in range(4))
            assert counted == pytest.approx(planned[f"all_to_all_bytes_{where}"])


def test_hostfile_launcher_on_one_host(tmp_path):
    """launch/multi_node_hostfile.sh with a one-host hostfile. The launcher would check ssh to the host
    first (and use pdsh for several hosts, which this machine cannot do); --no_ssh_check skips that."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# comment\nlocalhost slots=2\n")
    out = tmp_path / "run"
    succeed(start(["launch/multi_node_hostfile.sh", str(hostfile), "--ep_size", "2", *QUICK, "--output_dir", str(out)],
                  MASTER_PORT=str(free_port()), LAUNCHER_ARGS="--no_ssh_check"))
    assert expert_files(out, 3) == ALL_EXPERT_FILES


def test_slurm_script_with_stub_srun(tmp_path):
    """launch/slurm.sbatch on one 2-slot 'node': scontrol and srun are stubs, the launcher and ranks are real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'SLURM_NODEID=0 exec "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "run"
    env = launch_env()
    succeed(start(["bash", "launch/slurm.sbatch", "--ep_size", "2", *QUICK, "--output_dir", str(out)],
                  PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242",
                  SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="2", HOSTFILE_DIR=str(tmp_path),
                  MASTER_PORT=str(free_port())))
    assert (tmp_path / "hostfile.4242").read_text() == "localhost slots=2\n"
    assert expert_files(out, 3) == ALL_EXPERT_FILES


def test_accelerate_launch_with_the_deepspeed_plugin_trains_as_the_deepspeed_launcher(tmp_path):
    """The same flags under both launchers: the same processes and ranks, so the same losses step by step."""
    flags = ["--ep_size", "2", *QUICK, "--logging_steps", "1"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    succeed(start([*accelerate, "--config_file", "launch/accelerate_deepspeed.yaml", "--main_process_port",
                   str(free_port()), "train.py", *flags, "--output_dir", str(tmp_path / "accelerate")]))
    launch(["train.py", *flags, "--output_dir", str(tmp_path / "deepspeed")])
    assert expert_files(tmp_path / "accelerate", 3) == ALL_EXPERT_FILES
    by_accelerate, by_deepspeed = (logged_rows(tmp_path / name) for name in ("accelerate", "deepspeed"))
    assert sorted(by_accelerate) == sorted(by_deepspeed) == [(1, "loss"), (2, "loss"), (3, "eval_loss"), (3, "loss")]
    for key, value in by_deepspeed.items():
        assert by_accelerate[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("stage", ["zero0", "zero1"])
def test_other_zero_stages_train_with_ep2(tmp_path, stage):
    """zero0 runs without OMP_NUM_THREADS: each rank takes half the cores (train.py chooses its threads)."""
    out = tmp_path / "run"
    threads = {"OMP_NUM_THREADS": ""} if stage == "zero0" else {}
    output = launch(["train.py", "--ep_size", "2", "--deepspeed", stage, *QUICK, "--output_dir", str(out)], **threads)
    if threads:
        cores = len(os.sched_getaffinity(0))
        share = max(1, cores // 2)  # or fewer, with the machine's other load named (the line says "not {share}")
        assert re.search(rf"start-up: CPU threads: {share} per rank \({cores} cores available / 2 ranks|start-up: CPU "
                         rf"threads: \d+ per rank, not {share} \({cores} cores available / 2 ranks", output)
        assert output.count("start-up: CPU threads") == 1  # rank 0's line only
    # the all-to-all is torch's functional one, not the deprecated one; torch's warning about ZeRO 1/2's own
    # all_gather_into_tensor is dropped (run/library_noise.py)
    assert not [line for line in output.splitlines() if "FutureWarning" in line]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < 5.55  # ln(257): learning happened
    assert expert_files(out, 3) == ALL_EXPERT_FILES


# Checkpoints across ranks: exact resume at EP=2, resharding EP=2 <-> EP=1, stop signals.
RESUME = [*QUICK, "--logging_steps", "1", "--eval_steps", "0"]


def logged_losses(output_dir: Path) -> dict[int, float]:
    return {step: loss for (step, key), loss in logged_rows(output_dir).items() if key == "loss"}


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """8 steps on 2 ranks at ep_size 2, checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("ep2") / "run"
    launch(["train.py", "--ep_size", "2", *RESUME, "--max_steps", "8", "--save_steps", "4", "--output_dir", str(out)])
    return out


def test_resume_is_exact_on_two_ranks_at_ep2(ep2_run, tmp_path):
    out = tmp_path / "resumed"
    launch(["train.py", "--ep_size", "2", *RESUME, "--max_steps", "8", "--output_dir", str(out),
            "--resume_from_checkpoint", str(ep2_run / "checkpoints" / "global_step4")])
    resumed, straight = logged_losses(out), logged_losses(ep2_run)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in resumed] == [straight[s] for s in resumed]  # bit for bit


def test_reshard_ep2_to_ep1_and_back(ep2_run, tmp_path, world):
    import train
    from moe_models.moe.layer import moe_layers_of
    from moe_models.run.checkpoint_folder import CheckpointError

    tag = ep2_run / "checkpoints" / "global_step8"
    one_rank = tmp_path / "ep1"
    args = ["--ep_size", "1", *RESUME, "--max_steps", "10", "--output_dir", str(one_rank),
            "--resume_from_checkpoint", str(tag)]
    with pytest.raises(CheckpointError, match="saved with 2 ranks, ep_size 2 and --moe_impl grouped, this run has 1 ranks, ep_size 1 and"):
        train.build(train.parse_args(args))
    _, trainer = train.build(train.parse_args([*args, "--reset_optimizer", "--overwrite_output_dir"]))
    for layer_index, layer in enumerate(moe_layers_of(trainer.engine.module)):  # every global expert, by id
        for expert_id, expert in zip(layer.global_expert_ids(), layer.local_expert_weights()):
            saved = torch.load(tag / f"layer_{layer_index}_expert_{expert_id}_mp_rank_00_model_states.pt",
                               weights_only=False)
            for name, param in expert.items():
                key = next(k for k in saved if k.endswith(f"deepspeed_experts.{expert_id}.{name}"))
                torch.testing.assert_close(param.detach(), saved[key], rtol=0, atol=0)
    summary = trainer.train()
    assert summary["steps"] == 10 and summary["last_loss"] < 5.55

    back = tmp_path / "ep2-again"
    launch(["train.py", "--ep_size", "2", *RESUME, "--max_steps", "12", "--output_dir", str(back),
            "--resume_from_checkpoint", str(one_rank / "checkpoints"), "--reset_optimizer"])
    assert sorted(logged_losses(back)) == [11, 12]
    assert expert_files(back, 12) == ALL_EXPERT_FILES


def test_stop_signal_on_every_rank_saves_and_exits_zero(tmp_path):
    import psutil
    out = tmp_path / "run"
    proc = start([*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "train.py", "--ep_size", "2",
                  *RESUME, "--max_steps", "100000", "--output_dir", str(out)])
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").is_file() or len(logged_losses(out)) < 3:
        assert proc.poll() is None and time.time() < deadline, finish(proc, 10)[1][-6000:]
        time.sleep(0.5)
    for rank in psutil.Process(proc.pid).children(recursive=True):  # SLURM signals every process of the step
        rank.send_signal(signal.SIGUSR1)
    output = succeed(proc, timeout=120)
    assert output.count("stopped by SIGUSR1") == 1  # printed by rank 0
    step = int((out / "checkpoints" / "latest").read_text().removeprefix("global_step"))
    assert step >= 3 and expert_files(out, step) == ALL_EXPERT_FILES
