"""--moe_layers none (a dense run: the stock model trained as it is) and the checks of --upcycle_from_checkpoint.
The runs themselves are trained by tests/payoff (the dense run, and an upcycled run that starts as it)."""

import json

import pytest
import torch
from helpers import tiny_model

from moe_models.hf.configs import hf_moe_config
from moe_models.models.source import preset_config
from moe_models.moe.layer import moe_layers_of
from moe_models.moe.surgery import convert_to_moe
from moe_models.run.checkpoint_folder import CheckpointError
from moe_models.run.config import MoEConfig, RunConfig, TrainConfig
from moe_models.run.moe_layout import MoELayout, resolve_moe_layers
from moe_models.training.resumable import check_upcycle_source


def test_moe_layers_none_keeps_the_stock_dense_model():
    assert resolve_moe_layers("none", 4) == []
    assert MoELayout.resolve(MoEConfig(moe_layers="none"), 4).is_dense
    stock = tiny_model()
    converted = convert_to_moe(tiny_model(), MoEConfig(moe_layers="none"))
    assert moe_layers_of(converted) == []
    input_ids = torch.randint(0, 200, (2, 16))
    torch.testing.assert_close(converted(input_ids).logits, stock(input_ids).logits, rtol=0, atol=0)


def test_an_empty_block_list_points_to_moe_layers_none():
    with pytest.raises(ValueError, match="--moe_layers none"):
        resolve_moe_layers("", 4)


def test_export_refuses_a_dense_run():
    with pytest.raises(ValueError, match=r"no MoE layer \(--moe_layers none\)"):
        hf_moe_config(preset_config("tiny-llama"), MoEConfig(moe_layers="none"), MoELayout((), ()))


def dense_checkpoint(folder, blocks: list[int], step: int = 4):
    tag = folder / "checkpoints" / f"global_step{step}"
    tag.mkdir(parents=True)
    (tag / "complete.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (folder / "run_config.json").write_text(json.dumps({"resolved": {"moe_layout": {"blocks": blocks}}}))
    return tag


def upcycling(tag, tmp_path, max_steps: int = 8, moe_layers: str = "all") -> RunConfig:
    return RunConfig(moe=MoEConfig(moe_layers=moe_layers),
                     train=TrainConfig(output_dir=str(tmp_path / "up"), max_steps=max_steps,
                                       upcycle_from_checkpoint=str(tag)))


def test_a_dense_checkpoint_before_the_last_step_can_be_upcycled(tmp_path):
    check_upcycle_source(upcycling(dense_checkpoint(tmp_path / "dense", []), tmp_path))


@pytest.mark.parametrize("blocks, max_steps, moe_layers, message", [
    ([0, 1], 8, "all", "its run has MoE layers in blocks [0, 1]; upcycling takes a dense run's checkpoint"),
    ([], 4, "all", "is at step 4, and this run ends at --max_steps 4"),
    ([], 8, "none", "this run has --moe_layers none"),
])
def test_what_cannot_be_upcycled_is_refused_with_the_fix(tmp_path, blocks, max_steps, moe_layers, message):
    tag = dense_checkpoint(tmp_path / "dense", blocks)
    with pytest.raises(CheckpointError) as caught:
        check_upcycle_source(upcycling(tag, tmp_path, max_steps, moe_layers))
    assert message in str(caught.value)
