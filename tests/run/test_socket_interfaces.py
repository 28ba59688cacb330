"""GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME checked against the interfaces of the rank's own host."""

import subprocess
import sys

from helpers import REPO, launch_env

from moe_models.run.socket_interfaces import host_interfaces, interface_warnings

PRESENT = ["lo", "eth0", "ib0"]


def test_names_the_interfaces_a_host_lacks_by_each_variables_rules():
    """gloo: exact names; NCCL: prefixes, `=` exact, `^` an exclusion list."""
    def missing(**env):
        return [line.split(" names interface ")[1].split(",")[0] for line in interface_warnings(env, PRESENT)]
    assert missing() == []
    assert missing(GLOO_SOCKET_IFNAME="eth0") == []
    assert missing(GLOO_SOCKET_IFNAME="eth") == ["eth"]
    assert missing(GLOO_SOCKET_IFNAME="eth0,eth1") == ["eth1"]
    assert missing(NCCL_SOCKET_IFNAME="eth,ib") == []
    assert missing(NCCL_SOCKET_IFNAME="=eth") == ["eth"]
    assert missing(NCCL_SOCKET_IFNAME="enp") == ["enp"]
    assert missing(NCCL_SOCKET_IFNAME="^docker,lo") == []
    line, = interface_warnings({"GLOO_SOCKET_IFNAME": "bond0", "RANK": "3", "MASTER_ADDR": "10.0.0.1"}, PRESENT)
    assert line.startswith("warning: rank 3 on ")
    assert line.endswith(": GLOO_SOCKET_IFNAME names interface bond0, which this host does not have (it has lo, eth0, "
                         "ib0): set it, on this host, to the interface that reaches MASTER_ADDR 10.0.0.1, or unset it")


def test_this_hosts_interfaces_are_read():
    assert "lo" in host_interfaces()
    assert interface_warnings({"GLOO_SOCKET_IFNAME": "lo"}) == []


def test_a_rank_warns_before_gloo_fails_on_an_interface_its_host_lacks(netns_hosts):
    """In a namespace host (interfaces lo and link0), eth0 is missing: the rank says so before gloo's own error."""
    host = netns_hosts.hosts[1]
    done = subprocess.run(host.command([sys.executable, "-c", "from moe_models.run.distributed import init_world; "
                                        "init_world()"]), cwd=REPO, env=launch_env(GLOO_SOCKET_IFNAME="eth0"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    warning = (f"GLOO_SOCKET_IFNAME names interface eth0, which this host does not have (it has lo, {host.interface})"
               f": set it, on this host, to the interface that reaches MASTER_ADDR 127.0.0.1, or unset it")
    assert warning in done.stdout
    assert "Unable to find address for: eth0" in done.stderr
