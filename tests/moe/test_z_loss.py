"""The router z-loss (--router_z_loss_coef) against its formula written out here, on both expert paths; in a run it
is logged per layer and resumes exactly."""

import json

import pytest
import torch
from helpers import tiny_model

import train
from moe_models.moe.layer import MoEFeedForward
from moe_models.moe.model_layers import MoELayers
from moe_models.run.config import MoEConfig

DIM = 64


def layer(moe_impl: str, drop_tokens: bool, coef: float) -> MoEFeedForward:
    ffn = tiny_model(hidden_size=DIM, intermediate_size=96).model.layers[0].mlp
    cfg = MoEConfig(num_experts=4, top_k=2, moe_impl=moe_impl, drop_tokens=drop_tokens, router_z_loss_coef=coef,
                    top2_2nd_expert_sampling=False, use_rts=False, aux_loss_coef=0.0)
    moe = MoEFeedForward(ffn, DIM, 4, cfg).train()
    torch.manual_seed(3)
    with torch.no_grad():
        moe.router.wg.weight.normal_(0, 0.5)
    return moe


@pytest.mark.parametrize("moe_impl", ["deepspeed", "grouped"])
@pytest.mark.parametrize("drop_tokens", [False, True])
def test_z_loss_and_its_router_gradient_follow_the_formula(moe_impl, drop_tokens):
    moe, coef = layer(moe_impl, drop_tokens, coef=0.1), 0.1
    x = torch.randn(2, 24, DIM)
    moe(x)
    MoELayers(moe).router_loss(moe.balance_loss)[0].backward()  # the layer's weights: aux 0, z-loss coef
    weight = moe.router.wg.weight.detach().clone().requires_grad_(True)
    z = torch.logsumexp(x.reshape(-1, DIM) @ weight.t(), dim=-1).pow(2).mean()  # ST-MoE eq. 5
    (coef * z).backward()
    torch.testing.assert_close(moe.z_loss.detach(), z.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moe.router.wg.weight.grad, weight.grad, rtol=1e-5, atol=1e-7)


def test_off_by_default_adds_nothing():
    moe = layer("grouped", False, coef=0.0)
    moe(torch.randn(2, 24, DIM))
    assert moe.z_loss is None
    assert MoELayers(moe).router_loss(moe.balance_loss)[0].item() == 0.0


FLAGS = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--eval_steps", "0",
         "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--per_device_train_batch_size", "2",
         "--logging_steps", "1", "--router_z_loss_coef", "0.01", "--top2_2nd_expert_sampling", "false"]


def losses_and_z(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [value for r in rows if "loss" in r for value in (r["loss"], r["moe/layer_0/z_loss"])]


def test_a_run_logs_it_per_layer_and_resumes_exactly(world, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main([*FLAGS, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(full)])
    train.main([*FLAGS, "--max_steps", "4", "--output_dir", str(resumed),
                "--resume_from_checkpoint", str(full / "checkpoints" / "global_step2")])
    logged = losses_and_z(full)  # loss, z-loss of step 1, then of step 2, ...
    assert all(z > 0 for z in logged[1::2])
    assert losses_and_z(resumed) == pytest.approx(logged[4:], rel=1e-6)
