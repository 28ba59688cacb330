"""The docs' cheap facts against the code: messages the commands print, the number of families that convert, the
install command of an optional package, the default run's summary line. Nothing here trains."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO

from moe_models import train
from moe_models.metrics.sinks import log_problems
from moe_models.run.cli import parse_args

DOCS = REPO / "docs"


def one_line(text: str) -> str:
    return " ".join(text.split())


def fenced_after(text: str, opening: str) -> str:
    """The lines of the code block whose first line is ``opening``, after that line."""
    block = text[text.index(opening) + len(opening):]
    return block[:block.index("```")].strip("\n")


def test_quickstart_settings_example_is_what_train_prints(capsys):
    command = "$ python train.py --num_experts 6 --ep_size 4 --top_k 8"
    documented = fenced_after((DOCS / "quickstart.md").read_text(), command + "\n")
    with pytest.raises(SystemExit) as exit_:
        train.main(shlex.split(command)[3:])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip("\n") == documented


FLAG_ROW = re.compile(r"^\| `(--[a-z_]+ [^`]+)`(?: \(misspelt\))? \| `train\.py: error: ([^`]+)` \|$", re.M)


def test_troubleshooting_flag_errors_are_what_the_parser_prints(capsys):
    rows = FLAG_ROW.findall((DOCS / "troubleshooting.md").read_text())
    assert len(rows) >= 3, "the Flags table of docs/troubleshooting.md changed shape"
    for flags, message in rows:
        with pytest.raises(SystemExit):
            parse_args(shlex.split(flags))
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.split(": error: ", 1)[1] == message, flags


def test_family_counts_agree_with_the_coverage_table():
    """docs/models.md's table is the coverage test's output (tests/models/test_coverage.py keeps it current)."""
    converted = int(re.search(r"families in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, (\d+) convert",
                              (DOCS / "models.md").read_text())[1])
    assert f"{converted} families" in (REPO / "README.md").read_text()
    assert f"Supported families: {converted} " in (DOCS / "quickstart.md").read_text()
    from moe_models.models.architectures import ARCHITECTURES
    assert f"{len(ARCHITECTURES)} through the table" in one_line((DOCS / "quickstart.md").read_text())


def test_tensorboard_install_command_is_the_documented_one(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else found(name, *a))
    [problem] = log_problems(parse_args(["--report_to", "tensorboard"]).log)
    command = re.search(r"pip install -c constraints\.txt \"\.\[tensorboard\]\"", problem)[0]
    assert f"`{command}`" in one_line((DOCS / "metrics.md").read_text())
    assert f"`{problem}`" in (DOCS / "troubleshooting.md").read_text()


DONE_LINE = re.compile(r"^Done: .*$", re.M)


def test_quickstart_default_run_figures_agree(capsys):
    """The summary quoted in quickstart.md is in the form train.py prints, and the prose quotes the same figures."""
    text = (DOCS / "quickstart.md").read_text()
    done = DONE_LINE.search(text)[0]
    figures = re.fullmatch(r"Done: (\d+) steps, loss ([\d.]+) -> ([\d.]+), eval_loss ([\d.]+), (\d+) tokens/s \(whole run\) over "
                           r"(\d+) s\.", done)
    assert figures, done
    steps, first, last, eval_loss, tokens_per_sec, seconds = figures.groups()
    train.print_summary({"steps": int(steps), "stopped_by": None, "first_loss": float(first),
                         "last_loss": float(last), "eval_loss": float(eval_loss),
                         "tokens_per_sec": float(tokens_per_sec), "train_seconds": float(seconds)},
                        Path("outputs/run"), train.next_steps(Path("outputs/run"), exportable=True))
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == done
    assert "\n".join(printed[1:5]) in text  # the summary, the outputs and the next steps' commands, as printed
    prose = one_line(text[:text.index(done)])
    assert f"eval loss {float(eval_loss):.3f}" in prose or f"eval loss {eval_loss}" in prose
    assert f"loss {float(first):.2f} -> {float(last):.2f}" in prose
    assert f"{seconds} s of them in training steps" in prose
    assert f"{int(steps)} steps" in prose
