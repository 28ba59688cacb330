import os

# Tests never reach the hub or wandb's servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world():
    """A one-rank gloo process group in this test process (what `python train.py` makes)."""
    from moe_models.run.distributed import init_world
    return init_world()


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Packed blocks are cached in a folder of the session, not in ~/.cache (child processes inherit it)."""
    folder = tmp_path_factory.mktemp("data-cache")
    os.environ["MOE_MODELS_DATA_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def netns_hosts():
    """Two hosts on this machine as network namespaces, links at 1 Gbit/s (tests/netns_cluster.py), shared by the
    session's tests; skips, naming why, where namespaces cannot be made."""
    from netns_cluster import Unavailable, cluster
    try:
        with cluster(2, "1gbit") as made:
            yield made
    except Unavailable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def netns_ssh(netns_hosts, tmp_path_factory):
    """An sshd in each of netns_hosts' hosts, reached with keys of the session (tests/netns_sshd.py); skips, naming
    what is missing, where sshd or pdsh are not installed."""
    from netns_sshd import sshd_on, why_unavailable
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    with sshd_on(netns_hosts, tmp_path_factory.mktemp("ssh")) as made:
        yield made
