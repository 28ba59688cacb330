"""Expert parallelism across hosts: the launcher's no-ssh mode on two network namespaces (tests/netns_cluster.py),
one launcher in each, the ranks finding each other over the namespaces' link by GLOO_SOCKET_IFNAME."""

import json
import os
import signal

import pytest
from helpers import LAUNCHER, free_port, logged_rows, start, succeed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Small, deterministic routing (no random token selection, no sampled second expert), every step logged.
FLAGS = ["--num_experts", "4", "--top_k", "2", "--use_rts", "false", "--top2_2nd_expert_sampling", "false",
         "--max_steps", "3", "--warmup_steps", "1", "--synthetic_examples", "1000", "--block_size", "64",
         "--per_device_train_batch_size", "4", "--max_eval_batches", "2", "--logging_steps", "1", "--disable_tqdm"]


def test_ep2_over_two_hosts_equals_ep1_on_one(netns_hosts, tmp_path):
    """ep_size 2 on 2 hosts x 1 rank (the experts split across hosts: every all-to-all byte crosses the link) gives
    the losses and eval loss of ep_size 1 on 2 ranks of one launcher."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host-a slots=1\nhost-b slots=1\n")
    out, port = tmp_path / "hosts", str(free_port())
    sent_before = [host.sent_bytes() for host in netns_hosts.hosts]
    nodes = [start(host.command(["launch/multi_node_no_ssh.sh", str(hostfile), str(host.index),
                                 netns_hosts.master.address, "--ep_size", "2", *FLAGS, "--output_dir", str(out)]),
                   MASTER_PORT=port, GLOO_SOCKET_IFNAME=host.interface) for host in netns_hosts.hosts]
    reference = start([*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "train.py", "--ep_size", "1",
                       *FLAGS, "--output_dir", str(tmp_path / "one_host")])  # at the same time: the cores idle less
    try:
        outputs = [succeed(node) for node in nodes]
        sent = [host.sent_bytes() - before for host, before in zip(netns_hosts.hosts, sent_before)]
        succeed(reference)
    finally:  # a failed node leaves no launcher running
        for proc in (*nodes, reference):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outputs[1]
    assert not any("which this host does not have" in output for output in outputs)  # link0 is on every host
    across_hosts, one_host = logged_rows(out), logged_rows(tmp_path / "one_host")
    assert sorted(across_hosts) == sorted(one_host) == [(1, "loss"), (2, "loss"), (3, "eval_loss"), (3, "loss")]
    for key, value in one_host.items():
        assert across_hosts[key] == pytest.approx(value, rel=1e-5), key

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    across = sum(row[f"moe/layer_{i}/all_to_all_bytes_across_nodes"] for row in rows for i in range(4))
    assert sum(row[f"moe/layer_{i}/all_to_all_bytes_in_node"] for row in rows for i in range(4)) == 0
    assert across > 0
    assert min(sent) > across, f"bytes each host sent over its link {sent}, all-to-all bytes counted across {across}"
