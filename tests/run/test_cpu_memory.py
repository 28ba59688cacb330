"""CPU memory: freed large blocks are kept for reuse, so a step's page faults are not paid again every step."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_models.run.cpu_memory import keep_freed_memory

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the setting is made on a CPU only")

REPO = Path(__file__).resolve().parents[2]
FAULTS_OF_A_REPEATED_BLOCK = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from moe_models.run.cpu_memory import keep_freed_memory
    assert keep_freed_memory({}).startswith("CPU memory: freed blocks are kept")
def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)  # 64 MiB, above glibc's largest mmap threshold (32 MiB), freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_block()
faults_of_a_fresh_block()  # the heap may still grow once after the first block (seen: one more block's faults)
print(min(faults_of_a_fresh_block() for _ in range(3)))
"""


def page_faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REPEATED_BLOCK, mode], env=env, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_repeated_large_block_is_faulted_in_once_not_every_time():
    page = 4096
    assert page_faults("plain") >= 2**26 // page // 2  # glibc maps it afresh each time: every page faults again
    assert page_faults("keep") < 100                   # kept: the second and later blocks reuse the same pages


def test_the_users_malloc_setting_stands():
    line = keep_freed_memory({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert line == "CPU memory: glibc's allocator as MALLOC_MMAP_THRESHOLD_ sets it"
