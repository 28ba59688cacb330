"""Expert parallelism across hosts, two network namespaces (tests/netns_cluster.py) and the launchers users run: the
no-ssh mode, one launcher in each host, and the ssh mode, one launcher on the first host starting every rank through
pdsh and an sshd in each host (tests/netns_sshd.py). The ranks find each other over the namespaces' link by
GLOO_SOCKET_IFNAME; both give the losses of one ep_size 1 launch on one host, run once for the module (the no-ssh
run through a host cut off and a resume)."""

import json
import os
import signal
import time

import pytest
from helpers import LAUNCHER, finish, free_port, launch_env, logged_rows, rank_process, saved, start, succeed, wait_for

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Small, deterministic routing (no random token selection, no sampled second expert), every step logged.
FLAGS = ["--num_experts", "4", "--top_k", "2", "--use_rts", "false", "--top2_2nd_expert_sampling", "false",
         "--max_steps", "3", "--warmup_steps", "1", "--synthetic_examples", "1000", "--block_size", "64",
         "--per_device_train_batch_size", "4", "--max_eval_batches", "2", "--logging_steps", "1", "--disable_tqdm"]


class Reference:
    """ep_size 1 on 2 ranks of one launcher on this machine, started when first asked for and waited for once."""

    def __init__(self, out):
        self.out, self.proc, self.rows = out, None, None

    def start(self) -> None:
        if self.proc is None:
            self.proc = start([*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "train.py",
                               "--ep_size", "1", *FLAGS, "--output_dir", str(self.out)])

    def logged_rows(self) -> dict:
        self.start()
        if self.rows is None:
            succeed(self.proc)
            self.rows = logged_rows(self.out)
        return self.rows


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    reference = Reference(tmp_path_factory.mktemp("one_host"))
    yield reference
    if reference.proc is not None and reference.proc.poll() is None:
        os.killpg(reference.proc.pid, signal.SIGKILL)
        reference.proc.wait()


def stop(*procs) -> None:
    """Kill what is still running of these launchers (a failed node leaves none behind)."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def assert_same_losses(across_hosts: dict, one_host: dict) -> None:
    assert sorted(across_hosts) == sorted(one_host) == [(1, "loss"), (2, "loss"), (3, "eval_loss"), (3, "loss")]
    for key, value in one_host.items():
        assert across_hosts[key] == pytest.approx(value, rel=1e-5), key


def assert_bytes_crossed(out, sent: list[int]) -> None:
    """Every all-to-all byte was counted across nodes, and each host sent more than that over its link."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    across = sum(row[f"moe/layer_{i}/all_to_all_bytes_across_nodes"] for row in rows for i in range(4))
    assert sum(row[f"moe/layer_{i}/all_to_all_bytes_in_node"] for row in rows for i in range(4)) == 0
    assert across > 0
    assert min(sent) > across, f"bytes each host sent over its link {sent}, all-to-all bytes counted across {across}"


def test_ep2_through_ssh_equals_ep1_on_one(netns_hosts, netns_ssh, one_host, tmp_path):
    """`launch/multi_node_hostfile.sh` (deepspeed --hostfile, pdsh over ssh) run in the first host's namespace, the
    hostfile naming both hosts' addresses: DeepSpeed's ssh check, then one rank per host started by pdsh through
    that host's sshd, with the environment the launcher exports (PYTHON*, and DS_ENV_FILE's lines: an sshd session
    starts with none of the launcher's own). Same losses as ep_size 1 on one host."""
    hostfile, env_file = tmp_path / "hostfile", tmp_path / "deepspeed_env"
    hostfile.write_text("".join(f"{host.address} slots=1\n" for host in netns_hosts.hosts))
    ranks_env = {key: value for key, value in launch_env().items()
                 if key in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "MOE_MODELS_DATA_CACHE",
                            "PATH")  # the venv's ninja, which built the ops in the shared extensions folder
                 or key.startswith(("HF_", "WANDB_", "TORCH_"))}
    env_file.write_text("".join(f"{key}={value}\n" for key, value in
                                {**ranks_env, "GLOO_SOCKET_IFNAME": netns_hosts.master.interface}.items()))
    out = tmp_path / "ssh"
    sent_before = [host.sent_bytes() for host in netns_hosts.hosts]
    launcher = start(netns_hosts.master.command(["launch/multi_node_hostfile.sh", str(hostfile), "--ep_size", "2",
                                                 *FLAGS, "--output_dir", str(out)]),
                     MASTER_PORT=str(free_port()), DS_ENV_FILE=str(env_file),
                     PATH=f"{netns_ssh.bin}{os.pathsep}{launch_env()['PATH']}")
    one_host.start()
    try:
        output = succeed(launcher)
        sent = [host.sent_bytes() - before for host, before in zip(netns_hosts.hosts, sent_before)]
    finally:
        stop(launcher)
    assert f"Running on the following workers: {','.join(h.address for h in netns_hosts.hosts)}" in output
    assert f"{netns_hosts.hosts[1].address}: " in output and "nnodes=2, num_local_procs=1, node_rank=1" in output
    assert_same_losses(logged_rows(out), one_host.logged_rows())
    assert_bytes_crossed(out, sent)


def test_ep2_over_two_hosts_a_host_cut_off_and_the_resume_equal_ep1_on_one(netns_hosts, one_host, tmp_path):
    """ep_size 2 on 2 hosts x 1 rank, one no-ssh launcher in each (the experts split across hosts: every all-to-all
    byte crosses the link), a checkpoint every step. After the first, the second host's link goes down (`ip link set
    link0 down` in its namespace): each host's rank gives up within --dist_timeout_s and names the other host's
    address as not answering. With the link back up, --resume_from_checkpoint latest ends with every logged loss and
    the eval loss equal to those of the uninterrupted ep_size 1 run on 2 ranks of one launcher."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host-a slots=1\nhost-b slots=1\n")
    out, (first, second) = tmp_path / "hosts", netns_hosts.hosts

    def two_hosts(*flags: str) -> list:
        port = str(free_port())
        return [start(host.command(["launch/multi_node_no_ssh.sh", str(hostfile), str(host.index), first.address,
                                    "--ep_size", "2", *FLAGS, "--output_dir", str(out), *flags]),
                      MASTER_PORT=port, GLOO_SOCKET_IFNAME=host.interface) for host in netns_hosts.hosts]

    sent_before = [host.sent_bytes() for host in netns_hosts.hosts]
    nodes = two_hosts("--save_steps", "1", "--dist_timeout_s", "10")
    one_host.start()  # at the same time: the cores idle less
    try:
        wait_for(lambda: saved(out), 300, "the first checkpoint", every=0.02)
        held = rank_process(nodes[1].pid, 0)
        held.suspend()  # the second host's rank waits while its link goes: the cut falls inside the run
        second.set_link(False)
        cut = time.monotonic()
        held.resume()
        results = [finish(node, timeout=120) for node in nodes]
        waited = time.monotonic() - cut
    finally:
        second.set_link(True)
        stop(*nodes)
    print(f"both hosts exited {[code for code, _ in results]} {waited:.1f} s after the cut")
    assert all(code != 0 for code, _ in results) and waited < 45, f"exits {results} after {waited:.0f} s"
    assert "nnodes=2, num_local_procs=1, node_rank=1" in results[1][1]
    for (_, output), other in zip(results, (second, first)):
        assert "which this host does not have" not in output  # link0 is on every host
        line = next((line for line in output.splitlines() if "error: rank" in line), output[-3000:])
        print(line)
        assert "waited more than --dist_timeout_s (10 s)" in line
        assert f"Node not answering from this rank's node: {other.address} (rank {other.index}: " in line
        assert "Traceback" not in output

    latest = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("global_step"))
    assert latest < 3, "the run ended before the cut"
    resumed = two_hosts("--resume_from_checkpoint", "latest")
    try:
        for node in resumed:
            succeed(node)
        sent = [host.sent_bytes() - before for host, before in zip(netns_hosts.hosts, sent_before)]
    finally:
        stop(*resumed)
    assert_same_losses(logged_rows(out), one_host.logged_rows())
    assert_bytes_crossed(out, sent)


def test_a_hostfile_host_that_does_not_answer_ssh_is_named_at_once(netns_hosts, netns_ssh, tmp_path):
    """launch/multi_node_hostfile.sh with a hostfile whose second host (an address on the hosts' network that no
    host has) cannot be reached: one line naming it, before any rank starts, instead of the first host's ranks
    waiting for it (DeepSpeed's own ssh check asks the first host only)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{netns_hosts.master.address} slots=1\n10.0.0.250 slots=1\n")
    began = time.monotonic()
    code, output = finish(start(netns_hosts.master.command(["launch/multi_node_hostfile.sh", str(hostfile),
                                                            "--output_dir", str(tmp_path / "run")]),
                                PATH=f"{netns_ssh.bin}{os.pathsep}{launch_env()['PATH']}"), timeout=60)
    print(f"exited {code} after {time.monotonic() - began:.1f} s: {output.strip()}")
    assert code == 1
    assert output.count("\n") == 1 and output.startswith(f"error: host 10.0.0.250 in {hostfile} does not answer ssh")
    assert netns_hosts.master.address not in output.split("(")[0]
