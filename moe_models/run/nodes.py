"""Which node each rank runs on, and, once a collective has timed out, which of the other nodes no longer answer;
before the process group, whether this host resolves MASTER_ADDR at all.

A rank's node is the address it reaches MASTER_ADDR from (the kernel's choice of source address for that route; no
packet is sent), gathered from every rank once the process group exists. After a timeout, each other node is asked
for a TCP connection on a port nothing listens on: a refusal (or an accepted connection) means the node answers; no
route, an unreachable network or silence within the probe's time mean it does not, which is what a node whose link
went down, or that was switched off, looks like from here.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist

PROBE_PORT = 9  # the discard port: closed on almost every host, so a host that is up refuses at once
PROBE_TIMEOUT_S = 3.0


def own_address(master_addr: str | None = None) -> str:
    """The address this process reaches the master from (its node's address on that network)."""
    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master_addr, PROBE_PORT))  # UDP: picks the route and source address, sends nothing
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


def master_resolution_error(env=os.environ) -> str | None:
    """Why this host cannot resolve MASTER_ADDR (one line), or None. Without the check the rank would try to reach an
    unknown name until --dist_timeout_s and then blame the rendezvous."""
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        return None
    try:
        socket.getaddrinfo(master_addr, None)
    except socket.gaierror as err:
        return (f"MASTER_ADDR {master_addr} does not resolve on {socket.gethostname()} ({err.strerror}): set "
                "MASTER_ADDR (the launcher's --master_addr) to the first node's address, or to a name every node "
                "resolves")
    return None


def gather_nodes() -> dict[str, list[int]]:
    """address -> the ranks on that node, from every rank (one all-gather; every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {own_address(): [0]}
    addresses: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(addresses, own_address())
    nodes: dict[str, list[int]] = {}
    for rank, address in enumerate(addresses):
        nodes.setdefault(address, []).append(rank)
    return nodes


def why_silent(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the node at ``address`` answers a TCP connection (accepts or refuses it), else why not."""
    try:
        socket.create_connection((address, PROBE_PORT), timeout=timeout_s).close()
    except ConnectionRefusedError:
        return None
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as err:
        return err.strerror or str(err)
    return None


def silent_nodes(nodes: dict[str, list[int]], own: str | None = None) -> list[str]:
    """The other nodes that do not answer from here, each as 'ADDRESS (ranks ...: why)', probed at once."""
    own = own or own_address()
    others = [address for address in nodes if address != own]
    with ThreadPoolExecutor(max_workers=max(1, min(len(others), 32))) as pool:
        reasons = list(pool.map(why_silent, others))
    return [f"{address} (rank{'s' if len(nodes[address]) > 1 else ''} "
            f"{', '.join(map(str, nodes[address]))}: {reason})"
            for address, reason in zip(others, reasons) if reason]
