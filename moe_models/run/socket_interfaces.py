"""The network interface each rank's collectives use, checked on its own host before the process group is made.

`GLOO_SOCKET_IFNAME` (exact names, comma-separated) and `NCCL_SOCKET_IFNAME` (name prefixes, comma-separated; `=`
first for exact names, `^` first to exclude) choose it. A name the host does not have makes gloo fail with a
traceback ("Unable to find address for: ...") and NCCL find no socket, on that host only; the warning says which
variable, which name, and the interfaces the host has.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping


def host_interfaces() -> list[str]:
    """The names of this host's network interfaces (of this process's network namespace)."""
    return [name for _, name in socket.if_nameindex()]


def _missing(variable: str, value: str, present: list[str]) -> list[str]:
    if variable == "NCCL_SOCKET_IFNAME":
        if value.startswith("^"):  # an exclusion list: any other interface will do
            return []
        exact, value = value.startswith("="), value.removeprefix("=")
    else:
        exact = True
    names = [name.strip() for name in value.split(",") if name.strip()]
    return [name for name in names
            if not any(have == name if exact else have.startswith(name) for have in present)]


def interface_warnings(env: Mapping[str, str] = os.environ, present: list[str] | None = None) -> list[str]:
    """One line per interface named in GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME that this host does not have."""
    present = host_interfaces() if present is None else present
    where = f"rank {env.get('RANK', '0')} on {socket.gethostname()}"
    lines = []
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        for name in _missing(variable, env.get(variable, ""), present):
            lines.append(f"warning: {where}: {variable} names interface {name}, which this host does not have (it "
                         f"has {', '.join(present)}): set it, on this host, to the interface that reaches MASTER_ADDR "
                         f"{env.get('MASTER_ADDR', '')}, or unset it")
    return lines
