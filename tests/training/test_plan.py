"""The preflight plan (--plan) against reality: the bytes of weights, gradients and optimizer states a live engine
holds on each of 2 ranks (ZeRO 0, 1 and 2; ep_size 1 and 2) within 5%; its activation estimate against the bytes
autograd saves in a forward; the command and its fit advice."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, launch, launch_env, tiny_model

import train
from moe_models import MoEConfig, convert_to_moe, moe_layers_of
from moe_models.run.cli import parse_args
from moe_models.training.preflight import (GIB, Setup, activation_bytes, bytes_per_rank, checkpoint_kept_bytes,
                                           model_shape, smallest_fitting_change)

RUN = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--per_device_train_batch_size",
       "2", "--disable_tqdm"]


@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2"])
@pytest.mark.parametrize("ep_size", ["1", "2"])
def test_plan_matches_what_a_live_engine_holds(tmp_path, zero, ep_size):
    launch(["tests/scripts/plan_check.py", "--deepspeed", zero, "--ep_size", ep_size, *RUN,
            "--output_dir", str(tmp_path)])
    for rank in range(2):
        record = json.loads((tmp_path / f"plan_check_rank{rank}.json").read_text())
        for part in ("weights", "gradients", "optimizer_states"):
            held, predicted = record["held"][part], record["predicted"][part]
            assert held > 0 and predicted == pytest.approx(held, rel=0.05), (rank, part, held, predicted)


def saved_bytes(model, ids, checkpointing: bool) -> int:
    """Bytes of the tensors autograd saves in one forward (each storage once, weights left out); with
    checkpointing, plus each checkpointed block's input, which the checkpoint keeps."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, inputs = {}, []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0].nbytes))
             for block in model.model.layers] if checkpointing else []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    for hook in hooks:
        hook.remove()
    return sum(storages.values()) + sum(inputs)


@pytest.mark.parametrize("flags", [[], ["--top_k", "4"], ["--num_shared_experts", "1"],
                                   ["--expert_init", "granular", "--granularity", "2"], ["--moe_layers", "1,3"]])
def test_activation_estimate_is_within_10_percent_of_what_autograd_saves(flags):
    cfg = parse_args(["--num_experts", "8", "--block_size", "64", "--per_device_train_batch_size", "2",
                      "--drop_tokens", "false", *flags])
    shape = model_shape(cfg)
    setup = Setup(world_size=1, ep_size=1, zero_stage=0, bf16=False, offload_optimizer=False, micro_batch=2,
                  block_size=64, gradient_accumulation_steps=1, activation_checkpointing=False)
    ids = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    for checkpointing in (False, True):
        model = convert_to_moe(tiny_model().train(), cfg.moe)
        measured = saved_bytes(model, ids, checkpointing)
        estimate = (checkpoint_kept_bytes(shape, setup) if checkpointing else activation_bytes(shape, setup))
        assert estimate == pytest.approx(measured, rel=0.10), (checkpointing, estimate, measured)


def test_plan_command_writes_plan_json_and_says_what_fits(world, tmp_path, capsys):
    train.main([*RUN, "--plan", "--device_memory_gb", "0.02", "--output_dir", str(tmp_path)])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert set(plan["bytes_per_rank"]) == {"weights", "gradients", "optimizer_states", "activations", "total"}
    assert plan["fits"] is False and plan["smallest_fitting_change"]
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained
    shown = capsys.readouterr().out
    assert "Preflight plan" in shown and f"smallest change that fits: {plan['smallest_fitting_change']}" in shown


def test_one_process_plans_a_world_of_8(world, tmp_path, monkeypatch, capsys):
    """--plan_world_size 8 from one process: the plan a launch of 8 ranks makes (WORLD_SIZE=8 is what they see)."""
    flags = [*RUN, "--num_experts", "8", "--ep_size", "8", "--plan", "--deepspeed", "zero2"]
    with pytest.raises(SystemExit):  # one rank cannot hold ep_size 8: the refusal names the flag
        train.main([*flags, "--output_dir", str(tmp_path / "one")])
    assert "must divide the number of ranks (1): pass the ranks the plan is for, such as --plan_world_size 8" in \
        capsys.readouterr().err
    planned = train.main([*flags, "--plan_world_size", "8", "--output_dir", str(tmp_path / "planned")])
    shown = capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "8")
    launched = train.main([*flags, "--output_dir", str(tmp_path / "launched")])
    assert planned["setup"] == launched["setup"] and planned["setup"]["world_size"] == 8
    assert planned["bytes_per_rank"] == launched["bytes_per_rank"]
    p = planned["parameters"]
    assert p["local"] == pytest.approx(p["dense"] + p["experts"] / 8)  # one expert of each layer per rank
    assert shown.startswith("Preflight plan: 8 ranks, ep_size 8, ZeRO 2")
    if not torch.cuda.is_available():  # "bf16": "auto" on a machine without a GPU: the plan says it counts fp32
        assert "  precision: fp32, because the DeepSpeed JSON's \"bf16\": {\"enabled\": \"auto\"} follows the machine" \
            in shown and planned["precision_note"]


def test_plan_world_size_needs_the_plan(capsys):
    with pytest.raises(SystemExit):
        train.main([*RUN, "--plan_world_size", "8"])
    assert "plan_world_size (8) is only used by --plan" in capsys.readouterr().err


def test_the_advice_is_the_first_change_that_fits():
    shape = model_shape(parse_args(RUN))
    setup = Setup(world_size=2, ep_size=1, zero_stage=0, bf16=False, offload_optimizer=False, micro_batch=64,
                  block_size=512, gradient_accumulation_steps=1, activation_checkpointing=False)
    with_ckpt = bytes_per_rank(shape, Setup(**{**setup.__dict__, "activation_checkpointing": True}))["total"] / GIB
    assert bytes_per_rank(shape, setup)["total"] / GIB > with_ckpt * 1.001  # it does not fit as it is
    assert smallest_fitting_change(shape, setup, 4, with_ckpt * 1.001) == "--gradient_checkpointing"
    assert smallest_fitting_change(shape, setup, 4, 1e-6) is None


def test_a_bf16_run_loads_and_converts_the_dense_model_in_bf16(tmp_path):
    """The lean build: the dense folder is read in the training dtype, so no fp32 copy of it (or of the experts
    made from it) exists in a bf16 run; fp32 runs are unchanged."""
    from moe_models.models.source import load_dense_model
    from moe_models.run.config import ModelConfig
    from moe_models.training.ds_config import training_dtype
    tiny_model().save_pretrained(tmp_path)
    assert training_dtype({"bf16": {"enabled": True}}) == torch.bfloat16
    assert training_dtype({"bf16": {"enabled": False}}) == training_dtype({}) == torch.float32
    dense = load_dense_model(ModelConfig(model_name_or_path=str(tmp_path)), 257, dtype=torch.bfloat16)
    moe = convert_to_moe(dense, MoEConfig(num_experts=4))
    assert {p.dtype for p in moe.parameters()} - {torch.float32} == {torch.bfloat16}
    experts = [p for layer in moe_layers_of(moe) for p in layer.experts.parameters()]
    assert experts and all(p.dtype == torch.bfloat16 for p in experts)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_the_bf16_rules_match_what_a_live_bf16_engine_holds(tmp_path, stage):
    """One rank, a bf16 DeepSpeed JSON. At stage 0 the plan counts fp32 gradients beside the bf16 ones (DeepSpeed's
    unfused bf16 optimizer makes them inside its step, one group at a time): 3x what the engine holds after the
    backward, an upper bound left as it is."""
    config = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    config.update(bf16={"enabled": True}, zero_optimization={"stage": stage})
    (tmp_path / "bf16.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "tests/scripts/plan_check.py", "--deepspeed", str(tmp_path / "bf16.json"),
                             *RUN, "--output_dir", str(tmp_path)], cwd=REPO, env=launch_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "plan_check_rank0.json").read_text())
    for part in ("weights", "gradients", "optimizer_states"):
        held, predicted = record["held"][part], record["predicted"][part]
        factor = 3 if (stage, part) == (0, "gradients") else 1
        assert held > 0 and predicted == pytest.approx(factor * held, rel=0.05), (part, held, predicted)
