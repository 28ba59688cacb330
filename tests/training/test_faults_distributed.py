"""A rank that dies or freezes ends the whole job with a non-zero exit and a line saying so, instead of hanging it;
the last complete checkpoint then resumes as if nothing happened. Real launches on CPU ranks (gloo)."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from helpers import LAUNCHER, finish, free_port, rank_process, saved, start, succeed, wait_for

pytestmark = pytest.mark.distributed

RUN = ["--num_experts", "4", "--top_k", "2", "--use_rts", "false", "--top2_2nd_expert_sampling", "false",
       "--warmup_steps", "1", "--synthetic_examples", "1000", "--block_size", "64", "--per_device_train_batch_size",
       "4", "--eval_steps", "0", "--max_eval_batches", "1", "--logging_steps", "1", "--save_steps", "2",
       "--disable_tqdm"]


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_killed_rank_ends_the_launch(tmp_path):
    out = tmp_path / "run"
    launcher = start([*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "train.py", *RUN,
                      "--max_steps", "1000", "--output_dir", str(out)])
    wait_for(lambda: saved(out), 120, "the first checkpoint")
    rank_process(launcher.pid, 1).kill()
    killed = time.monotonic()
    code, output = finish(launcher, timeout=60)
    print(f"launch exited {code} {time.monotonic() - killed:.1f} s after the kill")
    assert code != 0 and time.monotonic() - killed < 60
    assert "--local_rank=1" in output and "exits with return code = -9" in output, output[-3000:]


def test_a_frozen_rank_ends_the_job_and_the_run_resumes_exactly(tmp_path):
    """Two launchers as two nodes without ssh (one rank each); node 1's rank is stopped with SIGSTOP mid-training.
    Node 0 must give up within --dist_timeout_s and say so; `--resume_from_checkpoint latest` then continues with
    the losses of an uninterrupted run."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")

    def two_nodes(out: Path, *flags: str) -> list:
        port = str(free_port())
        return [start(["launch/multi_node_no_ssh.sh", str(hostfile), str(rank), "127.0.0.1", "--ep_size", "2", *RUN,
                       "--output_dir", str(out), *flags], MASTER_PORT=port) for rank in (0, 1)]

    out = tmp_path / "frozen"
    nodes = two_nodes(out, "--max_steps", "1000", "--dist_timeout_s", "20")
    wait_for(lambda: saved(out), 120, "the first checkpoint")
    frozen = rank_process(nodes[1].pid, 0)
    frozen.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        code, output = finish(nodes[0], timeout=90)
        waited = time.monotonic() - stopped
    finally:
        os.killpg(nodes[1].pid, signal.SIGKILL)
        nodes[1].communicate()
    print(f"node 0 exited {code} {waited:.1f} s after the freeze")
    assert code != 0 and waited < 60, f"node 0 exited {code} after {waited:.0f} s"
    print(next((line for line in output.splitlines() if "error: rank" in line), "no error line"))
    assert "waited more than --dist_timeout_s (20 s) for the other ranks" in output, output[-3000:]
    assert "A rank is frozen or its node stopped answering" in output
    assert "Traceback" not in output

    latest = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("global_step"))
    end = latest + 2
    for node in two_nodes(out, "--max_steps", str(end), "--resume_from_checkpoint", "latest"):
        assert finish(node, timeout=300)[0] == 0
    reference = tmp_path / "reference"
    for node in two_nodes(reference, "--max_steps", str(end)):
        assert finish(node, timeout=300)[0] == 0
    resumed = losses(out)
    assert [resumed[s] for s in range(latest + 1, end + 1)] == pytest.approx(
        [losses(reference)[s] for s in range(latest + 1, end + 1)], rel=1e-5)


@pytest.mark.parametrize("zero", ["zero0", "zero2"])  # stage 0: the guard's own check; stage 2: DeepSpeed's
def test_a_nan_on_one_rank_is_skipped_on_every_rank_at_ep2(zero, tmp_path):
    out = tmp_path / "run"
    succeed(start([*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "tests/scripts/nan_on_rank.py",
                   "--ep_size", "2", "--deepspeed", zero, *RUN, "--max_steps", "4", "--save_steps", "1",
                   "--output_dir", str(out)], NAN_RANK="1", NAN_STEPS="3"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows if "loss" in r] == [0, 0, 1, 1]
    weights = {step: torch.load(out / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt",
                                weights_only=False)["module"] for step in (2, 3)}
    assert all(torch.equal(weights[2][name], weights[3][name]) for name in weights[2])  # no rank applied step 3
    for expert in range(4):  # the experts, on both ranks' halves, too
        files = [out / "checkpoints" / f"global_step{step}" / f"layer_0_expert_{expert}_mp_rank_00_model_states.pt"
                 for step in (2, 3)]
        before, after = (torch.load(f, weights_only=False) for f in files)
        assert all(torch.equal(before[name], after[name]) for name in before)
