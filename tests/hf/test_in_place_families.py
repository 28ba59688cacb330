"""Training works for each kind of HF MoE family continued through train.py, as for any run: GPT-OSS (sinks, a
clamped SwiGLU with biases), Qwen3-Next (linear attention), Nemotron-H (Mamba layers, ReLU-squared experts), OLMoE
and Mixtral (DeepSeek-V3 is in test_in_place_train.py). For each, through the launcher with ZeRO 2 on two ranks:
ep_size 2 gives the ep_size 1 losses, routing metrics and collapse warnings; its checkpoint resumes exactly (with
activation checkpointing, which recomputes each block: the eager losses) and at ep_size 1. In one process, bf16
trains close to fp32.

Both ep sizes run on two ranks: the family's balance loss is computed on each rank's own tokens, so one process
reading both ranks' sequences would differ by it (by 4e-5 of OLMoE's first loss). One launch trains every family in
turn (tests/scripts/train_in_turn.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, launch
from transformers import AutoConfig, AutoModelForCausalLM

import train
from moe_models.models.probe import small_moe_config
from moe_models.models.tokenization import byte_level_tokenizer
from moe_models.run.cli import parse_args
from moe_models.run.folder import RunFolder

# The family's config made small, and what the small config needs besides: Qwen3-Next's two small layers would both
# be linear attention (one in four is full attention), a model no checkpoint has and whose cache transformers refuses.
FAMILIES = {"gpt_oss": {}, "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]}, "nemotron_h": {},
            "olmoe": {}, "mixtral": {}}
FLAGS = ["--max_steps", "3", "--save_steps", "2", "--logging_steps", "1", "--eval_steps", "0", "--max_eval_batches",
         "1", "--synthetic_examples", "300", "--block_size", "32", "--warmup_steps", "1", "--disable_tqdm",
         "--deepspeed", "zero2", "--collapse_min_tokens", "0", "--collapse_effective_experts", "0.99"]


def save_family(folder, family: str):
    config = small_moe_config(AutoConfig.for_model(family))
    config.vocab_size = 257
    for key, value in FAMILIES[family].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def two_rank_runs(root, family: str) -> list[list[str]]:
    """ep_size 1 and 2 (two ranks, batches of 2), then the ep_size 2 checkpoint of step 2 resumed at ep_size 2 (with
    activation checkpointing) and at ep_size 1 (the weights, by global expert id, and a fresh optimizer state)."""
    common = ["--model_name_or_path", str(root / family / "model"), *FLAGS, "--per_device_train_batch_size", "2"]
    step2 = ["--resume_from_checkpoint", str(root / family / "ep2" / "checkpoints" / "global_step2")]
    return [[*common, "--ep_size", "1", "--output_dir", str(root / family / "ep1")],
            [*common, "--ep_size", "2", "--output_dir", str(root / family / "ep2")],
            [*common, "--ep_size", "2", *step2, "--gradient_checkpointing",
             "--output_dir", str(root / family / "ep2_resumed")],
            [*common, "--ep_size", "1", *step2, "--reset_optimizer",
             "--output_dir", str(root / family / "ep1_from_ep2")]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root / family / model, ep1, ep2, ep2_resumed, ep1_from_ep2: one launch for every family."""
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        save_family(root / family / "model", family)
    lines = [json.dumps(run) for family in FAMILIES for run in two_rank_runs(root, family)]
    (root / "runs.jsonl").write_text("\n".join(lines))
    launch(["tests/scripts/train_in_turn.py", str(root / "runs.jsonl")], timeout=300)
    return root


def rows(output_dir) -> list[dict]:
    return list(RunFolder(output_dir).metrics.rows())


def losses(output_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in rows(output_dir) if "loss" in row}


def warnings(output_dir) -> list[tuple]:
    return [(r["step"], r["layer"], r["condition"]) for r in rows(output_dir) if r.get("collapse") == "warning"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_ep2_through_the_launcher_trains_as_ep1_with_its_routing_metrics_and_collapse_warnings(runs, family):
    ep1, ep2 = runs / family / "ep1", runs / family / "ep2"
    assert losses(ep1).keys() == losses(ep2).keys() == {1, 2, 3}
    assert losses(ep2) == pytest.approx(losses(ep1), rel=1e-5)
    record = RunFolder(ep2).record()
    assert record.settings.moe.ep_size == 2 and record.resolved.imported_from == str(runs / family / "model")
    sparse = list(record.resolved.moe_layout.blocks)
    last = [r for r in rows(ep2) if "loss" in r][-1]
    routes = 2 * 2 * 32 * record.settings.moe.top_k  # ranks x sequences x tokens x top-k, one step
    for i in range(len(sparse)):
        assert sum(last[f"moe/layer_{i}/routed_per_expert"]) == routes
        for name in ("router_entropy", "imbalance", "effective_experts", "max_violation_step"):
            assert f"moe/layer_{i}/{name}" in last, name
    assert f"moe/layer_{len(sparse)}/routed_per_expert" not in last
    # an effective expert count below 0.99 x E warns from step 2 on, for every sparse layer, as at ep_size 1
    assert {(step, layer) for step, layer, _ in warnings(ep2)} >= {(2, i) for i in range(len(sparse))}
    assert warnings(ep2) == warnings(ep1)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_resumes_exactly_and_at_another_ep_size(runs, family):
    uninterrupted = losses(runs / family / "ep2")
    resumed = losses(runs / family / "ep2_resumed")  # recomputing each block in the backward pass
    assert resumed.keys() == {3} and resumed[3] == uninterrupted[3]
    # at ep_size 1 the step-3 loss is the weights' of step 2 on the same tokens; the optimizer state starts afresh
    at_ep1 = losses(runs / family / "ep1_from_ep2")
    assert at_ep1.keys() == {3} and at_ep1[3] == pytest.approx(uninterrupted[3], rel=1e-5)
    assert RunFolder(runs / family / "ep1_from_ep2").record().settings.moe.ep_size == 1


@pytest.mark.distributed
def test_a_resume_at_another_ep_size_without_reset_optimizer_is_refused_saying_why(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--model_name_or_path", str(runs / "olmoe" / "model"), *FLAGS, "--per_device_train_batch_size",
                    "4",
                    "--resume_from_checkpoint", str(runs / "olmoe" / "ep2" / "checkpoints" / "global_step2"),
                    "--output_dir", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert "ep_size 2" in err and "the optimizer state is sharded and ordered by the old layout" in err
    assert "Pass --reset_optimizer" in err and not (tmp_path / "refused" / "metrics.jsonl").exists()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_with_activation_checkpointing_trains_close_to_fp32_recomputing_each_block(runs, family, tmp_path):
    ds_config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds_config["bf16"] = {"enabled": True}
    (tmp_path / "bf16.json").write_text(json.dumps(ds_config))
    cfg = parse_args(["--model_name_or_path", str(runs / family / "model"), *FLAGS, "--deepspeed",
                      str(tmp_path / "bf16.json"), "--gradient_checkpointing", "--per_device_train_batch_size", "4",
                      "--output_dir", str(tmp_path / "run")])  # one process reading both ranks' sequences
    _, trainer = train.build(cfg)
    model = trainer.engine.module
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    blocks = list(model.model.layers)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        # a pre-hook: a recompute stops as soon as the backward has what it needs, before the block's end
        block.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + module.training))
    trainer.train()
    assert calls == [2 * 3] * len(blocks)  # a forward and a recompute per step
    assert losses(tmp_path / "run") == pytest.approx(losses(runs / family / "ep1"), rel=2e-3)
