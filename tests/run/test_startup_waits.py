"""Start-up waits that speak: a stale extension build lock is named, then ends the start with the fix."""

import subprocess
import sys
import threading
import time

import pytest
from helpers import REPO, free_port, launch_env

from moe_models.run.startup_waits import StartupWaitError, wait_for_extension_locks


def stale_lock(root):
    lock = root / "deepspeed_shm_comm" / "lock"  # where torch's FileBaton puts the build lock of DeepSpeed's op
    lock.parent.mkdir(parents=True)
    lock.touch()
    return lock


def test_a_stale_lock_is_named_then_ends_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = stale_lock(tmp_path)
    said = []
    started = time.monotonic()
    with pytest.raises(StartupWaitError, match=rf"lock {lock} has existed for \d+ s .*remove it \(rm {lock}\)"):
        wait_for_extension_locks(bound_s=1.0, notice_s=0.3, poll_s=0.05, say=said.append)
    assert time.monotonic() - started < 5
    assert len(said) == 1 and f"waiting for torch's extension build lock {lock}" in said[0]


def test_a_lock_that_goes_away_ends_the_wait(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = stale_lock(tmp_path)
    threading.Timer(0.3, lock.unlink).start()  # the other build finishes
    wait_for_extension_locks(bound_s=10.0, notice_s=5.0, poll_s=0.05, say=pytest.fail)
    assert not lock.exists()


def test_train_py_ends_on_a_stale_lock_with_one_clear_line(tmp_path):
    extensions = tmp_path / "extensions"
    lock = stale_lock(extensions)
    result = subprocess.run([sys.executable, "train.py", "--max_steps", "1", "--output_dir", str(tmp_path / "run")],
                            cwd=REPO, env=launch_env(TORCH_EXTENSIONS_DIR=str(extensions), MOE_MODELS_LOCK_WAIT_S="1"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"error: torch's extension build lock {lock} has existed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_one_rank_of_two_says_where_it_waits_then_ends_with_the_fix(tmp_path):
    port = str(free_port())
    env = launch_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    result = subprocess.run([sys.executable, "train.py", "--max_steps", "1", "--dist_timeout_s", "12",
                             "--output_dir", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert (f"still waiting after 10 s: rank 0 waits at 127.0.0.1:{port} for all 2 ranks to join the process group"
            in result.stdout)
    assert (f"error: rank 0: the 2 ranks did not all join the process group at 127.0.0.1:{port} within 12 s"
            in result.stderr)
    assert "1/2 clients joined" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # a start that did not happen writes nothing


def test_a_slow_model_load_says_what_it_loads(tmp_path, monkeypatch, capsys, world):
    import train
    from moe_models import train as command
    from moe_models.run.startup import StartupLines

    real = command.load_dense_model

    def slow(*args, **kwargs):
        time.sleep(0.5)  # a large model from a network disk
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "load_dense_model", slow)
    monkeypatch.setattr(StartupLines, "notice_s", 0.2)
    train.build(train.parse_args(["--num_experts", "4", "--synthetic_examples", "200", "--block_size", "32",
                                  "--disable_tqdm", "--output_dir", str(tmp_path / "run")]))
    out = capsys.readouterr().out
    assert ("start-up: still waiting after 0 s: building the model tiny-llama from its config in float32; then the "
            "surgery") in out
    assert out.index("still waiting") < out.index("start-up: model built and converted")
