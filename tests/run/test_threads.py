"""CPU threads per rank: each rank's share of the cores it may run on, unless the user chose them."""

import os
import time

import pytest
import torch

from moe_models.run.threads import busy_cores, choose_cpu_threads

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the choice is made on a CPU only")


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("env, cores, threads", [
    ({}, 6, 6),                                   # one process: every core it may run on
    ({"LOCAL_SIZE": "2"}, 6, 3),                  # DeepSpeed's launcher, 2 ranks on this node
    ({"LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "1"}, 8, 2),  # torchrun / accelerate
    ({"LOCAL_SIZE": "4"}, 2, 1),                  # more ranks than cores: one thread each
    ({"OMP_NUM_THREADS": "", "LOCAL_SIZE": "2"}, 4, 2),  # an empty variable is not a choice
])
def test_each_rank_takes_its_share_of_the_cores(env, cores, threads):
    line = choose_cpu_threads(env, cores=cores, load=0.0)  # an idle machine
    assert torch.get_num_threads() == threads
    assert line.startswith(f"CPU threads: {threads} per rank ({cores} cores available / ")


@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_the_users_choice_stands(variable):
    torch.set_num_threads(1)
    line = choose_cpu_threads({variable: "3", "LOCAL_SIZE": "1"}, cores=8)
    assert torch.get_num_threads() == 1  # not changed
    assert line == f"CPU threads: 1 per rank ({variable}=3 is set; unset it to share the cores among the ranks)"


@pytest.mark.parametrize("env, cores, load, threads", [
    ({}, 2, 1.2, 1),                   # one rank, 2 cores, another job on one of them (the slow case: 2 threads)
    ({}, 8, 3.4, 5),                   # 3 of 8 cores busy
    ({"LOCAL_SIZE": "2"}, 8, 3.4, 2),  # 5 free cores for 2 ranks
    ({}, 2, 9.0, 1),                   # busier than the machine: still one thread
])
def test_cores_other_work_keeps_busy_are_left_to_it(env, cores, load, threads):
    line = choose_cpu_threads(env, cores=cores, load=load)
    assert torch.get_num_threads() == threads
    share = cores // int(env.get("LOCAL_SIZE", 1))
    assert line.startswith(f"CPU threads: {threads} per rank, not {share} ({cores} cores available / ")
    assert f"the machine is busy, other work keeps {load:.1f} cores busy now" in line
    assert line.endswith(f"set OMP_NUM_THREADS={share} to take the share anyway")


def test_a_light_load_or_a_share_of_a_larger_machine_changes_nothing():
    assert choose_cpu_threads({}, cores=2, load=0.4).startswith("CPU threads: 2 per rank (2 cores available")
    assert choose_cpu_threads({"LOCAL_SIZE": "2"}, cores=2, load=1.0).startswith("CPU threads: 1 per rank (")
    assert busy_cores(cores=os.cpu_count() + 1) == 0.0  # the machine's time is spread over cores it does not run on


@pytest.mark.alone  # another test beside it could keep both cores busy: the child would not show
def test_a_busy_core_is_seen_at_once_and_an_idle_machine_as_idle():
    """The sample sees another process that keeps a core busy now (a busy loop in a child), and none once it ended:
    no minute's average lags behind."""
    import subprocess
    import sys
    cores = os.cpu_count()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # past its start-up
        busy = busy_cores(cores, seconds=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.6  # a whole core, less what the sample's rounding and the scheduler take
    assert busy_cores(cores, seconds=0.5) <= busy - 0.5  # gone at once
