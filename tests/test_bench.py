"""The benchmarks in bench/ still start: every script parses its arguments (imports included) and prints its help."""

import subprocess
import sys

import pytest

from helpers import REPO, child_env



@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")
                                           if not p.name.startswith("_")))  # _*.py: shared by the scripts
def test_benchmark_script_starts(script):
    result = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
