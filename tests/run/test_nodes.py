"""Each rank's node address, the probe that tells a node that answers from one that does not, and a master address
that does not resolve."""

import socket
import subprocess
import sys

from helpers import REPO, launch_env
from moe_models.run.nodes import master_resolution_error, own_address, silent_nodes, why_silent


def test_the_address_that_reaches_the_master_is_the_nodes():
    assert own_address("127.0.0.1") == "127.0.0.1"


def test_a_node_that_refuses_answers():
    assert why_silent("127.0.0.1") is None  # nothing listens on the probe's port: refused at once
    assert silent_nodes({"127.0.0.1": [0, 1]}, own="127.0.0.2") == []  # another node, up
    assert silent_nodes({"127.0.0.1": [0, 1]}, own="127.0.0.1") == []  # only this node: nothing to ask


def test_a_node_without_a_route_is_named_with_its_ranks(monkeypatch):
    def unreachable(address, timeout=None):
        raise OSError(113, "No route to host")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert silent_nodes({"10.0.0.1": [0], "10.0.0.2": [1, 2]}, own="10.0.0.1") == [
        "10.0.0.2 (ranks 1, 2: No route to host)"]


def test_a_master_address_this_host_cannot_resolve_is_one_line_at_once():
    """A rank whose MASTER_ADDR does not resolve stops before the rendezvous (which would retry the name until
    --dist_timeout_s, 600 s by default) with one line naming it."""
    assert master_resolution_error({"MASTER_ADDR": "127.0.0.1"}) is None
    done = subprocess.run([sys.executable, "train.py", "--output_dir", "unused"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=launch_env(RANK="1", LOCAL_RANK="0", WORLD_SIZE="2",
                                                                  MASTER_ADDR="no-such-host.invalid",
                                                                  MASTER_PORT="29555"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error (rank 1): MASTER_ADDR no-such-host.invalid does not resolve on "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
