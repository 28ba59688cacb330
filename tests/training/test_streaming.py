"""--streaming in a run: the losses after a resume from a mid-run checkpoint are those of the uninterrupted run, on
one rank and on two ranks through the deepspeed launcher, whose ranks read disjoint texts."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from helpers import REPO, child_env, launch
from moe_models.models.tokenization import byte_level_tokenizer

FLAGS = ["--num_experts", "4", "--block_size", "32", "--per_device_train_batch_size", "2", "--logging_steps", "1",
         "--eval_steps", "0", "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--streaming",
         "--streaming_validation_texts", "20", "--shuffle_buffer_size", "50", "--top2_2nd_expert_sampling", "false"]


def files(folder: Path, count: int) -> str:
    """``count`` files of 60 short texts, each text marked <f{file}:{number}>; as a glob."""
    for f in range(count):
        (folder / f"part{f}.jsonl").write_text("".join(
            json.dumps({"text": f"<f{f}:{i}> the {i % 7}th fox jumps over {i % 3} dogs"}) + "\n" for i in range(60)))
    return str(folder / "part*.jsonl")


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_streamed_run_resumes_exactly(world, tmp_path):
    glob = files(tmp_path, 3)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main([*FLAGS, "--train_file", glob, "--max_steps", "5", "--save_steps", "2", "--output_dir", str(full)])
    train.main([*FLAGS, "--train_file", glob, "--max_steps", "5", "--output_dir", str(resumed),
                "--resume_from_checkpoint", str(full / "checkpoints" / "global_step2")])
    straight, again = losses(full), losses(resumed)
    assert sorted(again) == [3, 4, 5] and [again[s] for s in again] == [straight[s] for s in again]
    position = json.loads((full / "checkpoints" / "global_step2" / "data_rank0.json").read_text())
    assert position["epoch"] == 0 and position["text"] > 0
    resolved = json.loads((full / "run_config.json").read_text())["resolved"]
    assert resolved["train_blocks"] is None and resolved["train_stream"] == {"shards": 3, "held_out_texts": 20}


def markers(batches: list[torch.Tensor]) -> set[str]:
    """The <f:n> markers whole inside the blocks (one cut by a block boundary is not counted)."""
    tokenizer = byte_level_tokenizer()
    return {found for batch in batches for block in batch for found in re.findall(r"<f\d:\d+>",
                                                                               tokenizer.decode(block))}


@pytest.mark.distributed
def test_two_ranks_read_disjoint_texts_and_resume_exactly(tmp_path):
    glob = files(tmp_path, 3)  # 3 files on 2 ranks: each rank reads all and keeps every 2nd text
    launch(["tests/scripts/stream_ranks.py", "--batches", "40", *FLAGS, "--train_file", glob,
            "--output_dir", str(tmp_path / "probe")])
    shares = [markers(torch.load(tmp_path / "probe" / f"batches_rank{r}.pt")) for r in range(2)]
    assert len(shares[0]) > 40 and len(shares[1]) > 40 and not shares[0] & shares[1]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(["train.py", *FLAGS, "--train_file", glob, "--max_steps", "4", "--save_steps", "2",
            "--output_dir", str(full)])
    launch(["train.py", *FLAGS, "--train_file", glob, "--max_steps", "4", "--output_dir", str(resumed),
            "--resume_from_checkpoint", str(full / "checkpoints" / "global_step2")])
    positions = [json.loads((full / "checkpoints" / "global_step2" / f"data_rank{r}.json").read_text())
                 for r in range(2)]
    assert positions[0] != positions[1]  # each rank has its own place in its own share
    straight, again = losses(full), losses(resumed)
    assert sorted(again) == [3, 4] and [again[s] for s in again] == [straight[s] for s in again]


def test_a_bad_line_reached_mid_run_ends_it_naming_the_file(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "zbad.jsonl"
    # 20 texts held out, then a first tokenised chunk of 64 texts (about 8 steps) before the stream reads on
    good.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(100)))
    bad.write_text(json.dumps({"text": "fine " * 40}) + "\n" + '{"text": "cut\n')
    result = subprocess.run([sys.executable, "train.py", *FLAGS, "--train_file", f"{good},{bad}", "--max_steps", "80",
                             "--shuffle_buffer_size", "0", "--output_dir", str(tmp_path / "run")],
                            cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {bad} line 2 is not valid JSON (Invalid control character at column 14); fix or remove that line "
        "(each line of a .jsonl file is one JSON object)")
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) > 3  # it trained before reaching it
