"""Flags, validation that reports every problem at once, and the DeepSpeed config's "auto" filling."""

import dataclasses
import json
import os
import re

import pytest

from moe_models.run.cli import build_parser, parse_args
from moe_models.run.config import ConfigError, MoEConfig, RunConfig
from moe_models.run.config_values import config_from_dict
from moe_models.training.ds_config import build_deepspeed_config, shipped_deepspeed_configs
from moe_models.training.validate import validate


def test_defaults_are_valid():
    validate(RunConfig())


def test_flags_reach_their_sections():
    cfg = parse_args(["--num_experts", "4", "--top_k", "1", "--moe_layers", "every:2", "--drop_tokens", "false",
                      "--noisy_gate_policy", "Jitter", "--learning_rate", "3e-4", "--block_size", "64",
                      "--model_config", "tiny-qwen3", "--use_residual"])
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.moe_layers) == (4, 1, "every:2")
    assert cfg.moe.drop_tokens is False and cfg.moe.use_residual is True and cfg.moe.noisy_gate_policy == "Jitter"
    assert cfg.train.learning_rate == 3e-4 and cfg.data.block_size == 64 and cfg.model.model_config == "tiny-qwen3"
    assert parse_args(["--num_experts", "2", "4", "8"]).moe.num_experts == [2, 4, 8]


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--num_expert", "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --num_expert" in err.splitlines()[-1]
    # Two lines, not argparse's usage of every flag (build_parser().format_usage() is dozens of lines)
    assert build_parser().format_usage().count("\n") > 20
    assert len(err.splitlines()) == 2 and "--help lists them all" in err.splitlines()[0]


@pytest.mark.parametrize("command", ["export", "report", "payoff"])
def test_other_commands_errors_are_short(command, capsys):
    import importlib
    main = importlib.import_module(f"moe_models.{command}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--no_such_flag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) <= 3, err
    assert "error: " in err.splitlines()[-1]


def test_run_config_round_trips_and_refuses_unknown_keys():
    cfg = parse_args(["--num_experts", "2", "4"])
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown key moe.num_expert"):
        config_from_dict({"moe": {"num_expert": 3}})


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = parse_args(["--num_experts", "6", "--ep_size", "4", "--top_k", "8", "--model_config", "tiny-falcon",
                      "--train_file", str(tmp_path / "missing.txt"), "--learning_rate", "0",
                      "--deepspeed", "zero9"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=2)
    text = str(err.value)
    for expected in ["num_experts (6) must be divisible by ep_size (4)", "top_k (8) must be <= num_experts (6)",
                     "ep_size (4) must divide the number of ranks (2)",
                     "model_config 'tiny-falcon' is neither a built-in preset (tiny-gpt2, tiny-llama",
                     "missing.txt' does not exist", "learning_rate (0.0) must be > 0",
                     "deepspeed config 'zero9' is neither a file nor a shipped config (zero0, zero1, zero2"]:
        assert expected in text
    assert len(err.value.problems) == 7


def test_ep_size_on_one_process_says_how_to_launch():
    with pytest.raises(ConfigError, match=r"launch with `deepspeed --num_gpus 2 train.py"):
        validate(parse_args(["--ep_size", "2"]), world_size=1)


def test_file_checks(tmp_path):
    bad = tmp_path / "corpus.docx"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="unsupported extension '.docx'"):
        validate(parse_args(["--train_file", str(bad)]))
    with pytest.raises(ConfigError, match="--validation_file needs --train_file"):
        validate(parse_args(["--validation_file", str(bad)]))


def test_existing_run_is_not_overwritten_by_accident(tmp_path):
    (tmp_path / "run_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run; pass --resume_from_checkpoint latest to continue it, "
                                          "--overwrite_output_dir to start over"):
        validate(parse_args(["--output_dir", str(tmp_path)]))
    validate(parse_args(["--output_dir", str(tmp_path), "--overwrite_output_dir"]))
    validate(parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"]))


@pytest.mark.parametrize("name", shipped_deepspeed_configs())
def test_every_shipped_deepspeed_config_fills_from_flags(name):
    cfg = parse_args(["--deepspeed", name, "--per_device_train_batch_size", "3", "--gradient_accumulation_steps",
                      "2", "--learning_rate", "5e-4", "--max_steps", "77", "--warmup_steps", "7"])
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["optimizer"]["params"]["lr"] == 5e-4
    assert ds["scheduler"]["params"]["total_num_steps"] == 77 and ds["scheduler"]["params"]["warmup_num_steps"] == 7
    assert "auto" not in json.dumps(ds)


def test_deepspeed_json_that_disagrees_with_a_flag_is_refused(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto",
                                "zero_optimization": {"stage": 3}, "optimizer": {"params": {"betas": "auto"}}}))
    with pytest.raises(ConfigError) as err:
        build_deepspeed_config(parse_args(["--deepspeed", str(path), "--per_device_train_batch_size", "8"]), 1)
    text = str(err.value)
    assert "train_micro_batch_size_per_gpu is 16 but per_device_train_batch_size gives 8" in text
    assert "ZeRO stage 3 does not work with DeepSpeed MoE layers" in text
    assert "no flag fills optimizer.params.betas" in text


def test_help_lists_every_field():
    text = build_parser().format_help()
    for flag in ["--num_experts", "--expert_init", "--deepspeed", "--train_file", "--model_config"]:
        assert flag in text


PLAN_FLAGS = ["--plan", "--device_memory_gb", "--plan_cluster", "--plan_nodes", "--plan_search", "--plan_world_size"]


def help_of(capsys, argv: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"^  (--\w+)", text, re.MULTILINE))


def test_plan_help_lists_the_plans_flags_only(capsys):
    """--plan --help (and --help plan) list the plan's six flags, not the hundred of every --help."""
    code, everything, _ = help_of(capsys, ["--help"])
    assert code == 0 and set(PLAN_FLAGS) < flags_in(everything) and len(flags_in(everything)) > 100
    for argv in (["--plan", "--help"], ["--help", "plan"], ["--num_experts", "4", "--help", "--plan"]):
        code, out, _ = help_of(capsys, argv)
        assert code == 0 and flags_in(out) == set(PLAN_FLAGS), argv
    code, out, _ = help_of(capsys, ["--help", "moe"])
    assert code == 0 and flags_in(out) == {f"--{f.name}" for f in dataclasses.fields(MoEConfig)}
    code, out, err = help_of(capsys, ["--help", "planz"])
    assert code == 2 and not out and "--help planz: no such topic; give a section (model, data, moe" in err


def test_configuration_doc_matches_the_code():
    from pathlib import Path
    from moe_models.run.cli import configuration_markdown
    path = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    if os.environ.get("UPDATE_DOCS") == "1":
        path.write_text(configuration_markdown())
    assert path.read_text() == configuration_markdown(), \
        "docs/configuration.md is stale: UPDATE_DOCS=1 pytest tests/test_config.py -k configuration_doc"
