"""How the memory benchmarks (bench/build_memory.py, bench/in_place_memory.py, bench/autoep_peer.py) measure host
memory: the process's peak resident memory (`ru_maxrss`) above its resident memory when the measure began, and the
bytes of the parameters a model holds. Memory-mapped safetensors pages count while they are resident."""

from __future__ import annotations

import resource

import psutil

GIB = 2**30


class PeakAbove:
    """The peak resident memory of this process since ``PeakAbove()`` above its resident memory then. The peak is
    the process's (``ru_maxrss`` never falls): measure one thing per process."""

    def __init__(self):
        self.before = psutil.Process().memory_info().rss

    def bytes(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.before  # KiB on Linux


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
