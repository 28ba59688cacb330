"""--gradient_checkpointing: transformers' activation checkpointing around blocks that hold MoE layers gives the same
losses, gradient norms and routing counts as without it (routes counted once, not again on the recompute), with
DeepSpeed's rules and with the scored rule's step-wide counts, and at ep_size 2."""

import json

import pytest

import train
from helpers import launch
from moe_models.run.cli import parse_args
from moe_models.moe.layer import moe_layers_of

RUN = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--eval_steps", "0",
       "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--per_device_train_batch_size", "2",
       "--logging_steps", "1", "--max_steps", "3", "--top2_2nd_expert_sampling", "false",
       "--gradient_accumulation_steps", "2", "--router_z_loss_coef", "0.01"]
SCORED = ["--score_function", "sigmoid", "--router_bias_update_rate", "0.01", "--aux_loss_type", "global_batch",
          "--drop_tokens", "false"]
KEYS = ("loss", "aux_loss", "grad_norm", "moe/layer_0/routed_per_expert", "moe/layer_1/tokens_per_expert",
        "moe/layer_2/z_loss", "moe/layer_3/routed_tokens")


def logged(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [[r[key] for key in KEYS] for r in rows if "loss" in r]


@pytest.mark.parametrize("rule", [[], SCORED], ids=["deepspeed_rule", "scored_rule"])
def test_same_losses_and_counts_with_and_without(world, tmp_path, rule):
    runs = {}
    for checkpointing in ("false", "true"):
        out = tmp_path / checkpointing
        train.main([*RUN, *rule, "--gradient_checkpointing", checkpointing, "--output_dir", str(out)])
        runs[checkpointing] = logged(out)
    assert len(runs["true"]) == 3
    for plain, checkpointed in zip(runs["false"], runs["true"]):
        assert checkpointed[:3] == pytest.approx(plain[:3], rel=1e-5)
        assert checkpointed[3:5] == plain[3:5]  # routes per expert: counted once
        assert checkpointed[5:] == pytest.approx(plain[5:], rel=1e-5)


def test_the_blocks_are_recomputed(world, tmp_path):
    """Without this the test above would pass with checkpointing silently off."""
    _, trainer = train.build(parse_args([*RUN, "--gradient_checkpointing", "--output_dir", str(tmp_path / "run")]))
    calls = []
    trainer.engine.train()
    # a pre-hook: the recompute stops early, inside the layer, once it has every tensor the backward needs
    moe_layers_of(trainer.engine.module)[0].register_forward_pre_hook(lambda *args: calls.append(1))
    trainer.train_step()
    assert len(calls) == 2 * 2  # each of the 2 micro-steps: the forward, then its recompute in the backward
    assert moe_layers_of(trainer.engine.module)[0].routing.sums(trainer.world.device).forwards == 2  # once per micro-step


@pytest.mark.distributed
def test_at_ep2_it_equals_the_run_without(tmp_path):
    for checkpointing in ("false", "true"):
        launch(["train.py", "--ep_size", "2", *RUN, *SCORED, "--gradient_checkpointing", checkpointing,
                "--output_dir", str(tmp_path / checkpointing)])
    plain, checkpointed = logged(tmp_path / "false"), logged(tmp_path / "true")
    assert len(plain) == 3
    for a, b in zip(plain, checkpointed):
        assert b[:3] == pytest.approx(a[:3], rel=1e-5)
        assert b[3:5] == a[3:5]
        assert b[5:] == pytest.approx(a[5:], rel=1e-5)
