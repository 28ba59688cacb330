"""Several hosts on one machine, for tests and benches: each host a Linux network namespace with its loopback and one
interface (`link0`, address 10.0.0.<i + 1>/24), all plugged into a bridge in a namespace of its own (the switch). Every
link is shaped with `tc ... tbf rate RATE` in both directions: the host's egress and the switch port's egress.

Ranks on one host talk over that host's loopback (the kernel routes a host's own address there); ranks on two hosts
cross two shaped ports. The namespaces have unique names per cluster (`moe-<pid>-<random>-...`), so parallel runs do
not clash, and are deleted when the `cluster` context ends, failing or not (deleting a namespace deletes its
interfaces), after killing what still runs in them; the bench entry point turns SIGTERM into that end too. A process
killed outright (SIGKILL) cannot clean up: the next cluster made on the machine does it for the namespaces whose
process no longer runs.

Needs root, `ip` and `tc` (Debian: iproute2). Where they are missing, `cluster` raises `Unavailable` with the reason
(tests skip with it). This kernel has no netem, so a link gets a rate and no delay.

Bench entry point: run a command once per host, each inside its namespace, then clean up:

    python tests/netns_cluster.py --hosts 2 --rate 200mbit -- \\
        launch/multi_node_no_ssh.sh HOSTFILE {node} {master} --ep_size 4 ...

`{node}` becomes the host's index, `{master}` host 0's address, `{address}` the host's own; every command gets
GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME set to the host's interface.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

INTERFACE = "link0"
BURST = "64kb"  # the tbf bucket: bytes that may leave at line rate before the rate applies


class Unavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, no namespace support)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def _shape(namespace: str, interface: str, rate: str) -> None:
    done = subprocess.run(["tc", "-n", namespace, "qdisc", "replace", "dev", interface, "root", "tbf", "rate", rate,
                           "burst", BURST, "latency", "100ms"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"tc could not shape {interface} in {namespace} to {rate}: {done.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    index: int
    namespace: str
    address: str
    interface: str = INTERFACE

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host's namespace (the environment and the file system stay the machine's)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def set_link(self, up: bool) -> None:
        """Bring the host's interface up or down (down: the host is cut off from every other host)."""
        _ip("-n", self.namespace, "link", "set", self.interface, "up" if up else "down")

    def sent_bytes(self) -> int:
        """Bytes this host has sent over its interface (what crossed to other hosts)."""
        path = f"/sys/class/net/{self.interface}/statistics/tx_bytes"
        done = subprocess.run(self.command(["cat", path]), capture_output=True, text=True, timeout=30, check=True)
        return int(done.stdout)


@dataclass(frozen=True)
class Cluster:
    hosts: list[Host]
    switch: str

    @property
    def master(self) -> Host:
        return self.hosts[0]

    def shape(self, rate: str) -> None:
        """Every link at `rate` (tc units: 200mbit, 1gbit), both directions."""
        for host in self.hosts:
            _shape(host.namespace, host.interface, rate)
            _shape(self.switch, f"port{host.index}", rate)


def why_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2"
    return None


def remove_stale() -> list[str]:
    """Delete the namespaces of clusters whose process no longer runs; their names."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    stale = [name for name, pid in re.findall(r"^(moe-(\d+)-[0-9a-f]{6}-\S+)", listed, re.MULTILINE)
             if not os.path.exists(f"/proc/{pid}")]
    for name in stale:
        _delete(name)
    return stale


def _delete(namespace: str) -> None:
    """Kill what still runs in the namespace, then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


@contextmanager
def cluster(hosts: int = 2, rate: str = "1gbit") -> Iterator[Cluster]:
    """`hosts` namespaces joined by a bridge, every link shaped to `rate`; on exit, what still runs in them is killed
    and they are deleted."""
    reason = why_unavailable()
    if reason:
        raise Unavailable(reason)
    prefix = f"moe-{os.getpid()}-{secrets.token_hex(3)}"
    switch = f"{prefix}-switch"
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", switch)
        except RuntimeError as error:
            raise Unavailable(str(error)) from None
        made.append(switch)
        remove_stale()
        _ip("-n", switch, "link", "add", "bridge0", "type", "bridge")
        _ip("-n", switch, "link", "set", "bridge0", "up")
        members = []
        for index in range(hosts):
            host = Host(index, f"{prefix}-host{index}", f"10.0.0.{index + 1}")
            _ip("netns", "add", host.namespace)
            made.append(host.namespace)
            _ip("link", "add", host.interface, "netns", host.namespace, "type", "veth", "peer", "name",
                f"port{index}", "netns", switch)
            _ip("-n", switch, "link", "set", f"port{index}", "master", "bridge0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
            members.append(host)
        made_cluster = Cluster(members, switch)
        made_cluster.shape(rate)
        yield made_cluster
    finally:
        for namespace in reversed(made):
            _delete(namespace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--rate", default="1gbit", help="every link's rate, tc units (200mbit, 1gbit)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each host runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command each host runs after --")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SystemExit: the namespaces are deleted on the way out
    with cluster(args.hosts, args.rate) as made:
        procs = []
        try:
            for host in made.hosts:
                argv_host = [part.format(node=host.index, master=made.master.address, address=host.address)
                             for part in command]
                env = {**os.environ, "GLOO_SOCKET_IFNAME": host.interface, "NCCL_SOCKET_IFNAME": host.interface}
                procs.append(subprocess.Popen(host.command(argv_host), env=env))
            codes = [proc.wait() for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
