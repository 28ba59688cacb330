"""The test cluster of network namespaces (tests/netns_cluster.py): hosts reach each other over links shaped to the
rate asked for, and nothing is left behind, even when the body fails."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from netns_cluster import BURST, Unavailable, cluster, why_unavailable

# Host 1 receives until the sender closes, and prints the bytes and the seconds from the first byte to the last.
RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 5000))
print("ready", flush=True)
connection, _ = server.accept()
data = connection.recv(1 << 20)
start, received = time.perf_counter(), len(data)
while data:
    data = connection.recv(1 << 20)
    received += len(data)
print(received, time.perf_counter() - start, flush=True)
"""
SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], 5000), timeout=30) as connection:
    connection.sendall(bytes(int(sys.argv[2])))
"""


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def two_hosts_at_40mbit():
    try:
        with cluster(2, "40mbit") as made:
            yield made
    except Unavailable as error:
        pytest.skip(str(error))


def test_a_host_reaches_another_at_the_links_rate(two_hosts_at_40mbit):
    """3 MB at 40 Mbit/s take at least 0.6 s once the tbf bucket is spent: an unshaped veth pair moves them in a few
    milliseconds."""
    sender_host, receiver_host = two_hosts_at_40mbit.hosts
    size, rate = 3_000_000, 40e6
    receiver = subprocess.Popen(receiver_host.command([sys.executable, "-c", RECEIVER, receiver_host.address]),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(sender_host.command([sys.executable, "-c", SENDER, receiver_host.address, str(size)]),
                       check=True, timeout=60)
        received, seconds = receiver.communicate(timeout=60)[0].split()
    finally:
        receiver.kill()
        receiver.wait()
    burst = int(BURST.removesuffix("kb")) * 1024
    assert int(received) == size
    assert (size - 2 * burst) * 8 / rate <= float(seconds) < 20
    assert sender_host.sent_bytes() >= size


def test_namespaces_are_deleted_even_when_the_body_fails():
    names = []
    with pytest.raises(ZeroDivisionError):
        try:
            with cluster(3) as made:
                names = [made.switch, *(host.namespace for host in made.hosts)]
                assert all(name in namespaces() for name in names)
                1 / 0
        except Unavailable as error:
            pytest.skip(str(error))
    assert len(names) == 4
    assert not any(name in namespaces() for name in names)


def test_why_unavailable_names_what_is_missing(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert why_unavailable() == "network namespaces need root (ip netns add)"
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "tc" else f"/sbin/{tool}")
    assert why_unavailable() == "tc not found: install iproute2"
    with pytest.raises(Unavailable, match="tc not found"):
        with cluster():
            pass


def test_the_bench_entry_point_cleans_up_when_terminated_and_a_killed_ones_namespaces_go_with_the_next_cluster():
    """What ran in the hosts is killed too: `sh` and its `sleep` child of each host."""
    def started():
        proc = subprocess.Popen([sys.executable, "tests/netns_cluster.py", "--", "sh", "-c", "echo up; sleep 60"],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "up\n" and proc.stdout.readline() == "up\n"
        names = [name for name in namespaces().split() if name.startswith(f"moe-{proc.pid}-")]
        pids = [int(pid) for name in names for pid in subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=True).stdout.split()]
        assert len(names) == 3 and len(pids) == 4
        return proc, names, pids

    def running(pid):  # a killed process may stay a zombie until its new parent reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def gone(names, pids):
        return not any(name in namespaces() for name in names) and not any(running(pid) for pid in pids)
    if why_unavailable():
        pytest.skip(why_unavailable())
    terminated, names, pids = started()
    terminated.terminate()
    assert terminated.wait(timeout=30) == 143
    assert gone(names, pids)

    killed, names, pids = started()
    killed.kill()
    killed.wait(timeout=30)
    assert not gone(names, pids)
    with cluster(2):
        assert gone(names, pids)
