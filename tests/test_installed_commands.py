"""The console scripts of a non-editable install (`moe-train`, `moe-export`, `moe-report`, `moe-payoff`), run from a
folder that is not the repository, alone and under the deepspeed launcher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, install_project, launch, launch_env

pytestmark = pytest.mark.slow

TINY = ["--num_experts", "4", "--max_steps", "2", "--warmup_steps", "1", "--synthetic_examples", "600",
        "--block_size", "32", "--per_device_train_batch_size", "4", "--max_eval_batches", "2", "--disable_tqdm"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install_project(tmp_path_factory.mktemp("installed"))


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def run(command: list[str], site: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command with only the installed copy of the package importable (no repository on PYTHONPATH)."""
    result = subprocess.run(command, cwd=cwd, env=launch_env(PYTHONPATH=str(site), COLUMNS="100"),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command[0]} exited {result.returncode}:\n{result.stderr[-6000:]}"
    return result.stdout


def options_part(help_text: str) -> str:
    """A --help text from its first option group on: the usage line above it wraps by the program's name."""
    return help_text[help_text.index("\noptions:"):]


def test_the_commands_are_installed_and_run_the_installed_package(site, elsewhere):
    assert sorted(p.name for p in (site / "bin").iterdir()) == ["moe-export", "moe-payoff", "moe-report", "moe-train"]
    imported = run([sys.executable, "-c", "import moe_models.train; print(moe_models.train.__file__)"], site,
                   elsewhere)
    assert Path(imported.strip()).is_relative_to(site)


def test_moe_train_takes_exactly_the_flags_of_train_py(site, elsewhere):
    installed = run([str(site / "bin" / "moe-train"), "--help"], site, elsewhere)
    script = run([sys.executable, str(REPO / "train.py"), "--help"], site, elsewhere)
    assert installed.startswith("usage: moe-train ")
    assert "--expert_init" in installed and "--report_to" in installed
    assert options_part(installed) == options_part(script)


def test_moe_export_moe_report_and_moe_payoff_answer_help(site, elsewhere):
    assert "--checkpoint" in run([str(site / "bin" / "moe-export"), "--help"], site, elsewhere)
    assert "output_dir" in run([str(site / "bin" / "moe-report"), "--help"], site, elsewhere)
    assert "--upcycle_at" in run([str(site / "bin" / "moe-payoff"), "--help"], site, elsewhere)


def test_train_report_and_export_from_another_folder(site, elsewhere):
    """Relative paths are the caller's; the DeepSpeed config name resolves to the installed package data."""
    output = run([str(site / "bin" / "moe-train"), *TINY, "--deepspeed", "zero2", "--output_dir", "run"], site,
                 elsewhere)
    assert "Done: 2 steps" in output
    run_dir = elsewhere / "run"
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["resolved"]["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step2"

    run([str(site / "bin" / "moe-report"), "run"], site, elsewhere)
    assert (run_dir / "report" / "summary.txt").is_file() and (run_dir / "report" / "loss.png").is_file()

    output = run([str(site / "bin" / "moe-export"), "--checkpoint", "run/checkpoints", "--output", "hf"], site,
                 elsewhere)
    assert "Wrote MixtralForCausalLM" in output
    assert json.loads((elsewhere / "hf" / "config.json").read_text())["num_local_experts"] == 4


@pytest.mark.distributed
def test_moe_train_under_the_deepspeed_launcher(site, elsewhere):
    """`deepspeed --num_gpus 2 $(which moe-train) ...`: the launcher runs the console script with python."""
    output = launch([str(site / "bin" / "moe-train"), "--ep_size", "2", *TINY, "--output_dir", "run"], cwd=elsewhere,
                    PYTHONPATH=str(site))
    assert "Done: 2 steps" in output
    expert_files = list((elsewhere / "run" / "checkpoints" / "global_step2").glob("layer_*_expert_*_*.pt"))
    assert len(expert_files) == 4 * 4  # 4 MoE layers x 4 experts, held by 2 ranks
    assert json.loads((elsewhere / "run" / "run_config.json").read_text())["resolved"]["world_size"] == 2
