"""A run folder written by release 0.1 (tests/fixtures/run_v0_1, from before the package was split into
subpackages) still resumes and exports. The expected figures are what release 0.1 itself produced from the same
folder: its losses when resuming the saved tag, and the logits of its own export."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import train
from helpers import REPO
from moe_models.hf.exporter import export

FIXTURE = REPO / "tests" / "fixtures" / "run_v0_1"
# The fixture's settings (its run_config.json): a 2-block Llama, d32 f64, 4 experts, top-2, grouped, dropless.
FLAGS = ["--model_config", str(FIXTURE / "base_model" / "config.json"), "--num_experts", "4", "--top_k", "2",
         "--synthetic_examples", "300", "--block_size", "16", "--per_device_train_batch_size", "2",
         "--save_steps", "2", "--warmup_steps", "1", "--eval_steps", "0", "--max_eval_batches", "1",
         "--logging_steps", "1", "--disable_tqdm", "--drop_tokens", "false", "--top2_2nd_expert_sampling", "false",
         "--synthetic_domains", "arithmetic,sorting,brackets,kv_recall,prose"]  # the built-in corpus of release 0.1
RELEASE_LOSSES = [5.534180164337158, 5.5970048904418945]  # steps 3 and 4, resumed from global_step2 by release 0.1
# Release 0.1's export of global_step2, on input ids (7 * i) % 257 for i < 12: logits[0, :4, :4], the sum and the
# sum of absolute values of all logits.
RELEASE_LOGITS = [[0.5563387274742126, -0.036440249532461166, 0.08614277094602585, -0.030761541798710823],
                  [-0.09626740217208862, 0.0839226171374321, 0.003775268327444792, -0.07408811897039413],
                  [0.12011143565177917, 0.03794381394982338, 0.025841448456048965, -0.09090304374694824],
                  [0.15206658840179443, -0.02723177894949913, 0.1853455901145935, 0.14368663728237152]]
RELEASE_SUMS = (14.211752726633677, 281.8399441965694)


def test_a_release_checkpoint_resumes_exactly(world, tmp_path):
    tag = FIXTURE / "checkpoints" / "global_step2"
    out = tmp_path / "resumed"
    train.main([*FLAGS, "--max_steps", "4", "--resume_from_checkpoint", str(tag), "--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(RELEASE_LOSSES, rel=1e-5)


def test_a_release_run_exports_the_same_model(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)  # a run_config.json without the resolved MoE layout of later runs
    export(run / "checkpoints", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = model((torch.arange(12) * 7 % 257).view(1, 12)).logits.double()
    torch.testing.assert_close(logits[0, :4, :4], torch.tensor(RELEASE_LOGITS, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert (logits.sum().item(), logits.abs().sum().item()) == pytest.approx(RELEASE_SUMS, rel=1e-5)
