"""CPU threads per rank: each rank's share of the cores it may run on, unless the user chose them."""

import pytest
import torch

from moe_models.run.threads import choose_cpu_threads

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
    line = choose_cpu_threads(env, cores=cores)
    assert torch.get_num_threads() == threads
    assert line.startswith(f"CPU threads: {threads} per rank ({cores} cores available / ")


@pytest.mark.parametrize("variable", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_the_users_choice_stands(variable):
    torch.set_num_threads(1)
    line = choose_cpu_threads({variable: "3", "LOCAL_SIZE": "1"}, cores=8)
    assert torch.get_num_threads() == 1  # not changed
    assert line == f"CPU threads: 1 per rank ({variable}=3 is set; unset it to share the cores among the ranks)"
