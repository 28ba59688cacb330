"""Faults end cleanly: non-finite steps are skipped everywhere and end the run after too many in a row, a failed
save loses nothing."""

import errno
import itertools
import json
from pathlib import Path

import pytest
import torch

import train
from moe_models import moe_layers_of
from moe_models.training import loop as loop_module
from moe_models.training.ds_config import SHIPPED_DIR

FLAGS = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--eval_steps", "0",
         "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--per_device_train_batch_size", "2",
         "--logging_steps", "1", "--drop_tokens", "false", "--top2_2nd_expert_sampling", "false"]


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def module_weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    tag = output_dir / "checkpoints" / f"global_step{step}"
    return torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def poison_losses(monkeypatch, steps: set[int] | None) -> None:
    """Make the LM loss NaN at the given optimizer steps (None: from step 3 on); gradients follow."""
    real, calls = loop_module.lm_loss_of, itertools.count(1)

    def poisoned(engine, inputs):
        lm_loss = real(engine, inputs)
        step = next(calls)
        return lm_loss * float("nan") if (step >= 3 if steps is None else step in steps) else lm_loss

    monkeypatch.setattr(loop_module, "lm_loss_of", poisoned)


def deepspeed_json(zero: str, dtype: str, folder: Path) -> str:
    """The shipped config ``zero``, in fp32 as on CPU (its "auto"), or a copy of it with bf16 on."""
    if dtype == "fp32":
        return zero
    config = json.loads((SHIPPED_DIR / f"{zero}.json").read_text())
    config["bf16"] = {"enabled": True}
    path = folder / f"{zero}_bf16.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("zero", ["zero0", "zero1"])  # stage 0: the guard checks; stage 1: DeepSpeed's check
def test_a_nan_step_is_skipped_and_counted(zero, dtype, world, tmp_path, monkeypatch, capsys):
    poison_losses(monkeypatch, {3})
    out = tmp_path / zero
    zero = deepspeed_json(zero, dtype, tmp_path)
    train.main([*FLAGS, "--deepspeed", zero, "--max_steps", "4", "--save_steps", "1", "--output_dir", str(out)])
    assert [r["nonfinite_steps"] for r in rows(out) if "loss" in r] == [0, 0, 1, 1]
    assert "step 3: the loss or gradient norm is not finite; the update was skipped on every rank" in capsys.readouterr().out
    before, skipped, after = (module_weights(out, step) for step in (2, 3, 4))
    assert all(torch.equal(before[name], skipped[name]) for name in before)  # step 3 changed nothing
    assert not all(torch.equal(skipped[name], after[name]) for name in skipped)  # step 4 trained again
    resumed = tmp_path / f"{zero}_resumed"  # the count is part of the run: a resume continues it
    train.main([*FLAGS, "--deepspeed", zero, "--max_steps", "5", "--output_dir", str(resumed),
                "--resume_from_checkpoint", str(out / "checkpoints" / "global_step3")])
    assert [r["nonfinite_steps"] for r in rows(resumed) if "loss" in r] == [1, 1]


def test_too_many_nonfinite_steps_stop_the_run_with_what_to_try(world, tmp_path, monkeypatch, capsys):
    poison_losses(monkeypatch, None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_code:
        train.main([*FLAGS, "--max_steps", "20", "--save_steps", "2", "--max_nonfinite_steps", "3",
                    "--output_dir", str(out)])
    assert exit_code.value.code == 1
    err = capsys.readouterr().err
    assert "steps 3..5: 3 optimizer steps in a row had a non-finite loss or gradient norm" in err
    assert f"The last checkpoint saved before step 3 is {out / 'checkpoints' / 'global_step2'}" in err
    assert "a lower --learning_rate" in err and "Traceback" not in err
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]  # step 5 raised before its row


def test_a_diverging_learning_rate_is_caught(world, tmp_path, capsys):
    """--learning_rate 1e30 used to train to the end on NaN and exit 0."""
    with pytest.raises(SystemExit) as exit_code:
        train.main([*FLAGS, "--learning_rate", "1e30", "--max_steps", "30", "--output_dir", str(tmp_path / "run")])
    assert exit_code.value.code == 1
    err = capsys.readouterr().err
    assert "10 optimizer steps in a row had a non-finite loss or gradient norm" in err
    assert "--learning_rate (now 1e+30)" in err


def test_a_failed_save_loses_nothing(world, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if "global_step4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_code:
        train.main([*FLAGS, "--max_steps", "6", "--save_steps", "2", "--output_dir", str(out)])
    assert exit_code.value.code == 1
    err = capsys.readouterr().err
    checkpoints = out / "checkpoints"
    assert f"saving checkpoint {checkpoints / 'global_step4'} failed on 1 of 1 ranks" in err
    assert "No space left on device" in err
    assert f"{checkpoints / 'global_step2'} is still the latest complete checkpoint" in err
    assert (checkpoints / "latest").read_text().strip() == "global_step2"
    assert not (checkpoints / "global_step4").exists()
    monkeypatch.undo()  # the disk has space again: the run continues from step 2
    train.main([*FLAGS, "--max_steps", "6", "--save_steps", "2", "--output_dir", str(out),
                "--resume_from_checkpoint", "latest"])
    assert (checkpoints / "latest").read_text().strip() == "global_step6"


def test_the_error_names_the_first_moe_layer_that_went_non_finite(world, tmp_path, monkeypatch, capsys):
    real, calls = loop_module.lm_loss_of, itertools.count(1)

    def break_router_of_layer_1(engine, inputs):
        if next(calls) == 3:
            with torch.no_grad():
                moe_layers_of(engine.module)[1].router.wg.weight.fill_(float("nan"))
        return real(engine, inputs)

    monkeypatch.setattr(loop_module, "lm_loss_of", break_router_of_layer_1)
    with pytest.raises(SystemExit):
        train.main([*FLAGS, "--max_steps", "20", "--max_nonfinite_steps", "2", "--output_dir", str(tmp_path / "run")])
    assert "the first non-finite value on the last batch appears in MoE layer 1 (router logits)" in capsys.readouterr().err
