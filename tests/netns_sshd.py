"""ssh into the hosts of a namespace cluster (tests/netns_cluster.py), as DeepSpeed's pdsh launcher does across nodes.

`sshd_on(cluster, folder)` makes, in `folder`, a host key and a client key (ssh-keygen), starts one sshd in each
host's namespace listening on the host's address (root may log in with the client key only), and writes an ssh client
config and an `ssh` in `folder/bin` that runs the real ssh with that config (`ssh -F`): with `folder/bin` first on
PATH, DeepSpeed's own ssh check and pdsh's ssh reach the hosts as a user's ~/.ssh/config would make them, while the
machine's ~/.ssh and /etc/ssh stay untouched. The sshds stop when the context ends (the cluster's end kills what
their sessions left).

sshd needs its privilege-separation folder, /run/sshd (what its service makes at boot): made if missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SSHD = "/usr/sbin/sshd"
CONNECT_TIMEOUT_S = 5


def why_unavailable() -> str | None:
    """What is missing for ssh between the hosts, or None (Debian: openssh-server, pdsh)."""
    missing = [name for name, found in (("sshd (openssh-server)", os.access(SSHD, os.X_OK)),
                                        ("ssh and ssh-keygen (openssh-client)",
                                         shutil.which("ssh") and shutil.which("ssh-keygen")),
                                        ("pdsh", shutil.which("pdsh"))) if not found]
    return f"{' and '.join(missing)} not installed" if missing else None


@dataclass(frozen=True)
class SshHosts:
    bin: Path  # holds the `ssh` that uses `config`: put it first on PATH
    config: Path


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


@contextmanager
def sshd_on(cluster, folder: Path) -> Iterator[SshHosts]:
    folder.mkdir(parents=True, exist_ok=True)
    host_key, client_key = folder / "host_key", folder / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    (folder / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    daemons = []
    try:
        for host in cluster.hosts:
            config = folder / f"sshd_config_{host.index}"
            config.write_text(f"ListenAddress {host.address}\nHostKey {host_key}\n"
                              f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                              "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                              f"StrictModes no\nPidFile {folder / f'sshd_{host.index}.pid'}\nPrintMotd no\n")
            daemons.append(subprocess.Popen(host.command([SSHD, "-D", "-e", "-f", str(config)]),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        client = folder / "ssh_config"
        client.write_text(f"Host *\n  User root\n  IdentityFile {client_key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
                          f"  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
                          f"  ConnectTimeout {CONNECT_TIMEOUT_S}\n")
        bin_folder = folder / "bin"
        bin_folder.mkdir(exist_ok=True)
        wrapper = bin_folder / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {client} "$@"\n')
        wrapper.chmod(0o755)
        hosts = SshHosts(bin_folder, client)
        for host, daemon in zip(cluster.hosts, daemons):  # each sshd answers before the test starts
            _wait_until_listening(host, daemon, hosts)
        yield hosts
    finally:
        for daemon in daemons:
            daemon.kill()
            daemon.wait()


def _wait_until_listening(host, daemon: subprocess.Popen, hosts: SshHosts) -> None:
    for _ in range(50):
        if daemon.poll() is not None:
            raise RuntimeError(f"sshd on {host.address} exited {daemon.returncode}: {daemon.stderr.read().strip()}")
        done = subprocess.run(host.command([str(hosts.bin / "ssh"), host.address, "true"]), capture_output=True,
                              text=True, timeout=30)
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"sshd on {host.address} does not answer: {done.stderr.strip()}")
