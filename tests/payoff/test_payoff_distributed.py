"""The payoff command under the deepspeed launcher: every run on 2 CPU ranks at ep_size 2, the inference measurement
on rank 0."""

import json

import pytest

from moe_models.comparison.runs import DENSE, DENSE_CONTINUED, MOE, UPCYCLED
from helpers import launch

pytestmark = pytest.mark.distributed


def test_the_payoff_runs_on_two_ranks_at_ep_size_2(tmp_path):
    out = tmp_path / "payoff"
    output = launch(["--module", "moe_models.payoff", "--output_dir", str(out), "--ep_size", "2", "--num_experts", "4",
                     "--max_steps", "6", "--eval_steps", "2", "--logging_steps", "2", "--warmup_steps", "2",
                     "--block_size", "32", "--synthetic_examples", "400", "--per_device_train_batch_size", "2",
                     "--max_eval_batches", "2", "--disable_tqdm", "--inference_batch", "2",
                     "--inference_new_tokens", "3"], timeout=600)
    assert output.count("Wrote ") == 1  # rank 0 reports
    for name in (DENSE, MOE, UPCYCLED, DENSE_CONTINUED):
        config = json.loads((out / name / "run_config.json").read_text())
        assert (config["resolved"]["world_size"], config["moe"]["ep_size"]) == (2, 2)
        assert (out / name / "checkpoints" / "latest").read_text() == "global_step6"
    evals = {name: {r["step"]: r["eval_loss"] for r in map(json.loads, (out / name / "metrics.jsonl").open())
                    if "eval_loss" in r} for name in (DENSE, UPCYCLED)}
    assert min(evals[UPCYCLED]) == 2  # the switch: half of 6 steps, rounded down to an eval step
    assert evals[UPCYCLED][2] == pytest.approx(evals[DENSE][2], rel=1e-5)
    results = json.loads((out / "payoff.json").read_text())
    assert results["tokens_per_step"] == 2 * 2 * 32
    assert set(results["summary"]["inference"]["models"]) == {DENSE, MOE, UPCYCLED}  # on rank 0, after the runs
