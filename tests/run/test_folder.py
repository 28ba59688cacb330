"""The run folder's one owner (run/folder.py): the run record read back as written, older records completed by the
settings they were written with, metrics.jsonl read with a last line a kill cut short, and refusals that name the
file."""

import json

import pytest

from moe_models.run.config import MoEConfig, RunConfig, TrainConfig
from moe_models.run.folder import LEGACY_MOE_SETTINGS, Resolved, RunFolder, RunRecord, RunRecordError
from moe_models.run.moe_layout import MoELayout


def test_a_record_reads_back_as_written(tmp_path):
    settings = RunConfig(moe=MoEConfig(num_experts=8, expert_init="granular", granularity=2, num_shared_experts=2),
                         train=TrainConfig(max_steps=7))
    layout = MoELayout.resolve(settings.moe, num_blocks=4)
    folder = RunFolder(tmp_path)
    folder.write_record(RunRecord(settings, Resolved(world_size=2, moe_layout=layout, domains=["a", "b"])))
    record = folder.record()
    assert record.settings == settings and record.resolved.world_size == 2 and record.resolved.domains == ["a", "b"]
    assert record.resolved.moe_layout == layout == MoELayout((0, 1, 2, 3), (8,) * 4, granularity=2,
                                                             num_shared_experts=2)
    assert layout.expert_width(256) == 128 and layout.shared_copies == 1 and layout.local_experts == (8,) * 4
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed


def test_a_layout_saved_before_its_width_was_recorded_takes_it_from_the_settings(tmp_path):
    moe = {"num_experts": 4, "expert_init": "granular", "granularity": 2, "ep_size": 2}
    (tmp_path / "run_config.json").write_text(json.dumps(
        {"moe": moe, "resolved": {"moe_layout": {"blocks": [0, 1], "num_experts": [4, 4]}}}))
    layout = RunFolder(tmp_path).record().resolved.moe_layout
    assert layout == MoELayout((0, 1), (4, 4), granularity=2, num_shared_experts=0, ep_size=2)
    assert layout.local_experts == (2, 2)


def test_an_moe_trainer_folder_of_an_earlier_version_still_reads(tmp_path):
    (tmp_path / LEGACY_MOE_SETTINGS).write_text(json.dumps(
        {"moe": {"num_experts": 4, "top_k": 1}, "moe_layout": {"blocks": [1], "num_experts": [4]}}))
    record = RunFolder(tmp_path).record()
    assert record.settings.moe.top_k == 1 and record.resolved.moe_layout == MoELayout((1,), (4,))
    assert record.sections == ("moe",) and RunFolder(tmp_path).holds_moe_settings()


def test_metrics_with_a_last_line_cut_short_read_without_it_and_say_so(tmp_path, capsys):
    metrics = RunFolder(tmp_path).metrics
    metrics.append({"step": 1, "loss": 2.0})
    metrics.append({"step": 2, "loss": 1.5})
    with metrics.path.open("a") as f:
        f.write('{"step": 3, "loss": 1.')  # a kill in the middle of a write
    assert [row["step"] for row in metrics.rows()] == [1, 2]
    assert f"{metrics.path}: its last line is cut short" in capsys.readouterr().err
    assert [row["step"] for row in metrics.keep_until(5)] == [1, 2]  # a resume rewrites the file without it
    assert metrics.path.read_text().count("\n") == 2 and metrics.rows() == metrics.keep_until(5)


def test_unreadable_files_are_refused_naming_them(tmp_path):
    folder = RunFolder(tmp_path)
    with pytest.raises(RunRecordError, match="run_config.json not found"):
        folder.record()
    folder.record_path.write_text('{"moe": {"num_experts": 4}')
    with pytest.raises(RunRecordError, match=f"{folder.record_path} is not valid JSON"):
        folder.record()
    folder.record_path.write_text('{"moe": {"num_expert": 4}}')
    with pytest.raises(RunRecordError, match="unknown key moe.num_expert"):
        folder.record()
    folder.metrics.path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunRecordError, match="metrics.jsonl line 2 is not a JSON row"):
        folder.metrics.rows()
