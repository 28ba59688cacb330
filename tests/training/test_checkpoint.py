"""Exact resume, complete-or-absent saves, pruning, stop signals, corrupt files, another world size."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, child_env

import train
from moe_models.hf.exporter import export
from moe_models.run.checkpoint_folder import CheckpointError, CheckpointFolder

FLAGS = ["--num_experts", "4", "--synthetic_examples", "1000", "--block_size", "64", "--logging_steps", "1",
         "--eval_steps", "0", "--max_eval_batches", "2", "--disable_tqdm", "--warmup_steps", "2"]


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=child_env(PYTHONPATH=str(REPO)))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, world):
    """12 steps in one go, checkpoints at 4, 8, 12."""
    out = tmp_path_factory.mktemp("straight")
    train.main([*FLAGS, "--max_steps", "12", "--save_steps", "4", "--output_dir", str(out)])
    return out


def test_resume_is_exact(straight_run, tmp_path):
    out = tmp_path / "resumed"
    summary = train.main([*FLAGS, "--max_steps", "12", "--output_dir", str(out), "--resume_from_checkpoint",
                          str(straight_run / "checkpoints" / "global_step4")])
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 8 * 64
    resumed, straight = losses(out), losses(straight_run)
    assert sorted(resumed) == list(range(5, 13))
    assert [resumed[s] for s in resumed] == [straight[s] for s in resumed]  # bit for bit


def test_a_checkpoint_without_per_rank_data_files_resumes_from_its_client_state(straight_run, tmp_path):
    """Checkpoints saved before data_rank{R}.json existed kept rank 0's position in the client state only."""
    import shutil
    old = tmp_path / "checkpoints"
    shutil.copytree(straight_run / "checkpoints" / "global_step8", old / "global_step8")
    assert json.loads((old / "global_step8" / "data_rank0.json").read_text()) == {"epoch": 0, "batches_in_epoch": 8}
    (old / "global_step8" / "data_rank0.json").unlink()
    out = tmp_path / "resumed"
    train.main([*FLAGS, "--max_steps", "12", "--output_dir", str(out), "--resume_from_checkpoint",
                str(old / "global_step8")])
    resumed, straight = losses(out), losses(straight_run)
    assert sorted(resumed) == [9, 10, 11, 12] and [resumed[s] for s in resumed] == [straight[s] for s in resumed]


def test_resume_latest_continues_in_place_and_trims_metrics(straight_run, tmp_path):
    out = tmp_path / "run"
    train.main([*FLAGS, "--max_steps", "6", "--save_steps", "3", "--output_dir", str(out)])
    # pretend the run went on past its last checkpoint (step 6) before dying: those rows must go
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 7, "loss": 123.0}) + "\n")
    train.main([*FLAGS, "--max_steps", "9", "--save_steps", "3", "--output_dir", str(out),
                "--resume_from_checkpoint", "latest"])
    assert sorted(losses(out)) == list(range(1, 10)) and 123.0 not in losses(out).values()
    assert (out / "checkpoints" / "latest").read_text() == "global_step9"


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    (tmp_path / "new").mkdir()  # a start killed before its first save left rows behind: they go
    (tmp_path / "new" / "metrics.jsonl").write_text('{"step": 5, "loss": 123.0}\n')
    summary = train.main([*FLAGS, "--max_steps", "2", "--output_dir", str(tmp_path / "new"),
                          "--resume_from_checkpoint", "latest"])
    assert summary["steps"] == 2 and sorted(losses(tmp_path / "new")) == [1, 2]


def test_save_total_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    train.main([*FLAGS, "--max_steps", "8", "--save_steps", "2", "--save_total_limit", "2", "--output_dir", str(out)])
    assert [t.name for t in CheckpointFolder(out / "checkpoints").complete_tags()] == ["global_step6", "global_step8"]
    assert (out / "checkpoints" / "latest").read_text() == "global_step8"


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = run("tests/scripts/kill_during_save.py", "global_step6", *FLAGS, "--max_steps", "8", "--save_steps", "3",
                 "--output_dir", str(out))
    assert result.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    assert (checkpoints / "global_step6").is_dir()  # partly written
    assert (checkpoints / "latest").read_text() == "global_step3"
    assert [t.name for t in CheckpointFolder(checkpoints).complete_tags()] == ["global_step3"]
    with pytest.raises(CheckpointError, match=r"global_step6 is incomplete .*previous good checkpoint .*global_step3"):
        train.build(train.parse_args([*FLAGS, "--max_steps", "8", "--output_dir", str(out),
                                      "--resume_from_checkpoint", str(checkpoints / "global_step6")]))
    with pytest.raises(ValueError, match="global_step6 is incomplete"):
        export(checkpoints, tmp_path / "hf", tag="global_step6")
    summary = train.main([*FLAGS, "--max_steps", "8", "--save_steps", "3", "--output_dir", str(out),
                          "--resume_from_checkpoint", "latest"])
    assert summary["steps"] == 8 and sorted(losses(out)) == list(range(1, 9))


def test_corrupt_file_names_itself_and_the_previous_good_tag(straight_run, tmp_path):
    import shutil
    copy = tmp_path / "checkpoints"
    shutil.copytree(straight_run / "checkpoints", copy)
    victim = copy / "global_step12" / "layer_2_expert_1_mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError) as err:
        train.build(train.parse_args([*FLAGS, "--max_steps", "12", "--output_dir", str(tmp_path / "out"),
                                      "--resume_from_checkpoint", str(copy)]))
    assert str(victim) in str(err.value) and "previous good checkpoint" in str(err.value)
    assert "global_step8" in str(err.value)


def test_stop_signal_saves_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *FLAGS, "--max_steps", "100000", "--output_dir", str(out)],
                            cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").is_file() or len(losses(out)) < 3:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by SIGUSR1" in output
    step = int((out / "checkpoints" / "latest").read_text().removeprefix("global_step"))
    assert step >= 3 and (out / "checkpoints" / f"global_step{step}" / "complete.json").is_file()
    summary = train.main([*FLAGS, "--max_steps", str(step + 2), "--output_dir", str(out),
                          "--resume_from_checkpoint", "latest"])
    assert summary["steps"] == step + 2
