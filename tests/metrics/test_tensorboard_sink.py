"""--report_to tensorboard: a real run's event files read back with TensorBoard's own reader; the --report_to
spellings and the problems it is refused for."""

import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_models.run.cli import parse_args
from moe_models.metrics.sinks import MetricsLog, log_problems, open_sinks, report_targets
from train import main

FLAGS = ["--num_experts", "4", "--max_steps", "4", "--logging_steps", "2", "--eval_steps", "2", "--max_eval_batches",
         "2", "--warmup_steps", "1", "--synthetic_examples", "600", "--block_size", "32",
         "--per_device_train_batch_size", "4", "--disable_tqdm"]


def events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    accumulator.Reload()
    return accumulator


def test_tensorboard_holds_every_number_of_every_row_and_the_heatmaps_at_each_eval(world, tmp_path):
    out = tmp_path / "run"
    main([*FLAGS, "--output_dir", str(out), "--report_to", "tensorboard"])
    assert not (out / "wandb").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = events(out / "tensorboard")
    numbers = {(key, r["step"]): value for r in rows for key, value in r.items()
               if key != "step" and isinstance(value, (int, float))}
    assert {key for key, _ in numbers} == set(logged.Tags()["scalars"])
    for (key, step), value in numbers.items():
        (event,) = [e for e in logged.Scalars(key) if e.step == step]
        assert event.value == pytest.approx(value, rel=1e-6), (key, step)  # stored as float32
    assert [e.step for e in logged.Scalars("loss")] == [1, 2, 4]
    assert [e.step for e in logged.Scalars("eval_loss")] == [2, 4]
    for tag in ("moe/expert_load", "moe/domain_experts"):  # the domain x expert heatmaps: the built-in corpus's domains
        images = logged.Images(tag)
        assert [e.step for e in images] == [2, 4]
        assert all(e.encoded_image_string.startswith(b"\x89PNG") and e.width > 100 for e in images)


def test_a_resumed_run_purges_the_steps_it_logs_again(tmp_path):
    """Rows after the checkpoint's step were logged before the stop; TensorBoard drops them on reading."""
    cfg = parse_args(["--report_to", "tensorboard", "--disable_tqdm"])
    for start, steps in ((0, (1, 2, 3)), (2, (3, 4))):
        sinks = open_sinks(cfg, is_main=True, output_dir=tmp_path, jsonl=MetricsLog(tmp_path / "m.jsonl", False))
        sinks.start(step=start)
        for step in steps:
            sinks.log({"step": step, "loss": 10.0 * start + step})
        sinks.close()
    assert [(e.step, e.value) for e in events(tmp_path / "tensorboard").Scalars("loss")] == \
        [(1, 1.0), (2, 2.0), (3, 23.0), (4, 24.0)]


@pytest.mark.parametrize("spelling, targets", [("none", []), ("None", []), ("wandb", ["wandb"]),
                                               ("TensorBoard", ["tensorboard"]),
                                               ("wandb, tensorboard", ["wandb", "tensorboard"]),
                                               ("tensorboard,wandb,tensorboard", ["tensorboard", "wandb"])])
def test_report_to_spellings(spelling, targets):
    assert report_targets(spelling) == targets
    assert log_problems(parse_args(["--report_to", spelling]).log) == []


@pytest.mark.parametrize("spelling", ["mlflow", "wandb,mlflow", "none,wandb", ""])
def test_unknown_report_targets_are_refused(spelling):
    assert log_problems(parse_args(["--report_to", spelling]).log) == [
        f"report_to {spelling!r} names {'nothing' if not spelling else 'mlflow' if 'mlflow' in spelling else 'none'}: "
        "use none, wandb, tensorboard, or both as wandb,tensorboard"]


def test_tensorboard_without_its_package_is_refused_with_the_install_command(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else found(name, *a))
    problems = log_problems(parse_args(["--report_to", "wandb,tensorboard"]).log)
    assert problems == ["report_to tensorboard needs the tensorboard package, which is not installed: pip install -c "
                        "constraints.txt \".[tensorboard]\" in a source checkout (pip install \"moe-models[tensorboard]\" "
                        "elsewhere), or leave tensorboard out of --report_to"]
