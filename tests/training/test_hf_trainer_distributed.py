"""MoETrainer on 2 CPU ranks through the real deepspeed launcher (tests/scripts/hf_trainer_run.py): ep_size 2 trains as
ep_size 1 does, every expert is saved in its own file, resume is exact, and both a checkpoint and a final save_model()
folder export to an HF MoE class (GLM4-MoE: the runs use sigmoid scores with the aux-loss-free bias) that stock
transformers loads with the trained logits."""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import launch, trainer_losses
from moe_models.hf.exporter import export

pytestmark = pytest.mark.distributed

RUN = "tests/scripts/hf_trainer_run.py"


def run(output_dir: Path, ep_size: int, *flags: str) -> list[dict]:
    launch([RUN, "--ep_size", str(ep_size), "--output_dir", str(output_dir), "--max_steps", "4", *flags])
    return [torch.load(output_dir / f"result_rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps (seed, data, 2 ranks, checkpoints at 2 and 4) at ep_size 1 and 2."""
    root = tmp_path_factory.mktemp("hf_trainer")
    return {ep: (root / f"ep{ep}", run(root / f"ep{ep}", ep)) for ep in (1, 2)}


def training_rows(result: dict) -> list[dict]:
    return [row for row in result["log_history"] if "loss" in row]


def test_ep2_trains_as_ep1(runs):
    """Losses (LM + router losses), routing counters summed over ranks and aux-loss-free biases, step by step."""
    ep1, ep2 = runs[1][1][0], runs[2][1][0]
    rows1, rows2 = training_rows(ep1), training_rows(ep2)
    assert [row["step"] for row in rows2] == [1, 2, 3, 4]
    for row1, row2 in zip(rows1, rows2):
        assert row2["loss"] == pytest.approx(row1["loss"], rel=1e-5)
        assert row2["aux_loss"] == pytest.approx(row1["aux_loss"], rel=1e-5)
        per_expert = [key for key in row1 if key.startswith("moe/layer_") and key.rsplit("/", 1)[1].isdigit()]
        # layers x ((tokens, routed, score_bias) x experts + the real-experts histogram's top_k + 1 bins)
        assert len(per_expert) == 4 * (3 * 4 + 3)
        assert {key: row2[key] for key in per_expert} == {key: row1[key] for key in per_expert}
        routes = sum(row1[f"moe/layer_0/routed_per_expert/{e}"] for e in range(4))
        assert routes == 2 * 2 * 2 * 32  # ranks x batch x k x S
    assert any(rows1[0][f"moe/layer_{i}/score_bias/{e}"] != 0 for i in range(4) for e in range(4))  # they moved
    for bias1, bias2 in zip(ep1["score_bias"], ep2["score_bias"]):
        torch.testing.assert_close(bias2, bias1, rtol=0, atol=0)


def test_every_expert_is_saved_in_its_own_file_and_the_model_file_holds_rank_0s(runs):
    checkpoint = runs[2][0] / "checkpoint-2"
    files = {p.name for p in (checkpoint / "global_step2").glob("layer_*_expert_*_model_states.pt")}
    assert files == {f"layer_{i}_expert_{e}_mp_rank_00_model_states.pt" for i in range(4) for e in range(4)}
    with pytest.raises(ValueError, match="trained at ep_size 2, its model file holds only rank 0's experts"):
        export_without_deepspeed_files(checkpoint, checkpoint.parent / "safetensors_only")


def export_without_deepspeed_files(checkpoint: Path, copy: Path) -> None:
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("global_step*", "latest"))
    export(copy, copy / "hf")


def test_resume_at_ep2_gives_the_same_losses_and_biases(runs, tmp_path):
    straight = runs[2][1][0]
    resumed = run(tmp_path / "resumed", 2, "--resume", str(runs[2][0] / "checkpoint-2"))[0]
    want, got = trainer_losses(straight["log_history"]), trainer_losses(resumed["log_history"])
    assert [got[step] for step in (3, 4)] == pytest.approx([want[step] for step in (3, 4)], rel=1e-6)
    for bias, resumed_bias in zip(straight["score_bias"], resumed["score_bias"]):
        torch.testing.assert_close(resumed_bias, bias, rtol=0, atol=0)


@pytest.mark.parametrize("folder", ["checkpoint-4", "final"])
def test_ep2_exports_load_natively_with_the_trained_logits(runs, folder, tmp_path):
    """The last checkpoint, and the folder of the save_model() every rank called after training."""
    run_dir, results = runs[2]
    export(run_dir / folder, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    with torch.no_grad():
        logits = hf(results[0]["logits_input"]).logits
    torch.testing.assert_close(logits, results[0]["logits"], rtol=1e-4, atol=1e-4)
