"""The catalogue of bad inputs: each one ends the run with a non-zero exit and a last line that says what is wrong
and how to fix it, with no Python traceback, in seconds, and before anything in an existing run folder changes.
docs/troubleshooting.md lists the messages.

Most cases run train.main in this process; the launch cases that need several ranks use the real launcher.
"""

import hashlib
import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

import train
from helpers import LAUNCHER, finish, free_port, start
from moe_models.run.cli import parse_args
from moe_models.run.startup import StartupLines
from moe_models.training.ds_config import SHIPPED_DIR

QUICK = ["--num_experts", "4", "--max_steps", "1", "--warmup_steps", "1", "--synthetic_examples", "200",
         "--block_size", "32", "--per_device_train_batch_size", "2", "--max_eval_batches", "1", "--eval_steps", "0",
         "--disable_tqdm"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, world):
    """A finished one-step run (num_experts 4, top_k 2, tiny-llama) with its checkpoint: the existing output
    folder that no refused case may change."""
    out = tmp_path_factory.mktemp("bad-inputs") / "run"
    train.main([*QUICK, "--output_dir", str(out)])
    assert (out / "checkpoints" / "latest").read_text() == "global_step1"
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args: list[str], expected: str, folder: Path | None = None, base: list[str] = QUICK) -> str:
    """Run train.main(base + args); it must exit non-zero without a traceback, its last stderr line must hold
    ``expected``, and ``folder`` (an existing run) must be byte-identical afterwards."""
    before = snapshot(folder) if folder else None
    with pytest.raises(SystemExit) as exit_:
        train.main([*base, *args])
    out, err = capsys.readouterr()
    assert exit_.value.code not in (0, None)
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert expected in last, err[-4000:]
    if folder:
        assert snapshot(folder) == before, f"{folder} changed"
    return last


def into(run: Path) -> list[str]:
    """Write into the existing run folder (what a user re-running a command does)."""
    return ["--output_dir", str(run), "--overwrite_output_dir"]


# Flags ---------------------------------------------------------------------------------------------------------

FLAG_CASES = {
    "top_k_zero": (["--top_k", "0"], "top_k (0) must be >= 1"),
    "top_k_above_experts": (["--top_k", "5"], "top_k (5) must be <= num_experts (4)"),
    "unknown_choice": (["--noisy_gate_policy", "Gaussian"], "invalid choice 'Gaussian'; choose from Jitter, RSample, None"),
    "not_a_bool": (["--drop_tokens", "maybe"], "expected true or false, got 'maybe'"),
    "misspelt_flag": (["--max_stepz", "10"], "unrecognized arguments: --max_stepz"),
    "block_beyond_positions": (["--model_config", "tiny-gpt2", "--block_size", "1024"],
                               "block_size (1024) is longer than the model's 512 positions (n_positions of the "
                               "tiny-gpt2 preset); use --block_size 512 or less"),
    "zero_learning_rate": (["--learning_rate", "0"], "learning_rate (0.0) must be > 0"),
    "zero_warmup": (["--warmup_steps", "0"], "warmup_steps (0) must be >= 1"),
    "moe_layer_beyond_model": (["--moe_layers", "7"], "moe_layers '7' names blocks [7], but the model has blocks 0..3"),
    "scored_rule_on_stock_gate": (["--score_function", "sigmoid", "--moe_impl", "deepspeed"],
                                  "--score_function sigmoid: the stock DeepSpeed gate (--moe_impl deepspeed) routes by "
                                  "softmax top-k with its own balance loss only; use --moe_impl grouped"),
    "negative_bias_rate": (["--router_bias_update_rate", "-0.001"], "router_bias_update_rate (-0.001) must be >= 0"),
    "granularity_not_dividing_the_ffn": (["--expert_init", "granular", "--granularity", "3", "--num_experts", "3"],
                                         "granularity (3) must divide the FFN's 256 hidden units (block 0) for "
                                         "--expert_init granular: pick a divisor of 256, such as 2, 4, 8, 16, 32, 64"),
    "compile_grouped_in_fp32": (["--compile"], "--compile with --moe_impl grouped needs bf16 (this run trains in "
                                "float32): torch's compiler kernel of the grouped GEMM (torch._grouped_mm) takes bf16 "
                                "inputs only"),
    "unknown_report_target": (["--report_to", "mlflow"],
                              "report_to 'mlflow' names mlflow: use none, wandb, tensorboard, or both as "
                              "wandb,tensorboard"),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_flag(case, capsys, run_dir):
    args, expected = FLAG_CASES[case]
    refused(capsys, [*args, *into(run_dir)], expected, folder=run_dir)


def test_existing_run_folder_without_resume_or_overwrite(capsys, run_dir):
    refused(capsys, ["--output_dir", str(run_dir)], "already holds a run; pass --resume_from_checkpoint latest",
            folder=run_dir)


@pytest.mark.parametrize("spelling, value", [("None", None), ("none", None), ("null", None), ("jitter", "Jitter"),
                                             ("RSample", "RSample")])
def test_documented_spellings_of_a_choice_are_accepted(spelling, value):
    assert parse_args(["--noisy_gate_policy", spelling]).moe.noisy_gate_policy == value


@pytest.mark.parametrize("spelling", ["true", "True", "TRUE", "yes", "1"])
def test_documented_spellings_of_true_are_accepted(spelling):
    assert parse_args(["--use_residual", spelling, "--peak_tflops", "None"]).moe.use_residual is True


# DeepSpeed JSON ------------------------------------------------------------------------------------------------

def ds_file(tmp_path: Path, change) -> str:
    """The shipped zero2.json, changed by ``change`` (a function of the dict), as a file."""
    config = json.loads((SHIPPED_DIR / "zero2.json").read_text())
    change(config)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


DS_CASES = {
    "zero3": (lambda c: c["zero_optimization"].update(stage=3), "ZeRO stage 3 does not work with DeepSpeed MoE layers"),
    "conflicting_batch_size": (lambda c: c.update(train_batch_size=64),
                               "train_batch_size is 64 but per_device_train_batch_size x gradient_accumulation_steps "
                               "x world size gives 2; write \"auto\""),
    "unknown_optimizer": (lambda c: c["optimizer"].update(type="AdamQ"),
                          "optimizer.type 'AdamQ' is not an optimizer DeepSpeed knows; use one of"),
    "unknown_scheduler": (lambda c: c["scheduler"].update(type="Cosine"),
                          "scheduler.type 'Cosine' is not a DeepSpeed schedule; use one of"),
}


@pytest.mark.parametrize("case", DS_CASES)
def test_deepspeed_json(case, capsys, run_dir, tmp_path):
    change, expected = DS_CASES[case]
    refused(capsys, ["--deepspeed", ds_file(tmp_path, change), *into(run_dir)], expected, folder=run_dir)


def test_deepspeed_json_that_does_not_parse(capsys, run_dir, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2},}')
    refused(capsys, ["--deepspeed", str(bad), *into(run_dir)], "is not valid JSON", folder=run_dir)


def test_deepspeed_config_that_does_not_exist(capsys, run_dir):
    refused(capsys, ["--deepspeed", "zero9", *into(run_dir)],
            "deepspeed config 'zero9' is neither a file nor a shipped config", folder=run_dir)


# Data files ----------------------------------------------------------------------------------------------------

DATA_CASES = {
    "empty": ("train.txt", b"", [], "is empty; give a file that holds text"),
    "malformed_jsonl_line": ("train.jsonl", b'{"text": "one"}\n{"text": "two\n{"text": "three"}\n', [],
                             "line 2 is not valid JSON"),
    "wrong_text_column": ("train.jsonl", b'{"body": "some text"}\n' * 40, [],
                          "no column 'text'; its columns are ['body']. Pass --text_column"),
    "too_short_for_a_block": ("train.txt", b"hi\n" * 40, ["--block_size", "256"],
                              "the train split gives no block of 256 tokens"),
    "not_utf8": ("train.txt", "caf\xe9 cr\xe8me\n".encode("latin-1") * 40, [],
                 "is not UTF-8: the byte at offset 3 (line 1) is not valid UTF-8. Convert the file to UTF-8"),
    "unsupported_extension": ("train.docx", b"text", [], "unsupported extension '.docx'"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_file(case, capsys, run_dir, tmp_path):
    name, content, flags, expected = DATA_CASES[case]
    (tmp_path / name).write_bytes(content)
    refused(capsys, ["--train_file", str(tmp_path / name), *flags, *into(run_dir)], expected, folder=run_dir)


def test_data_folder_instead_of_a_file(capsys, run_dir, tmp_path):
    refused(capsys, ["--train_file", str(tmp_path), *into(run_dir)],
            f"is a folder; give its files with a glob, such as '{tmp_path / '*.jsonl'}'", folder=run_dir)


def jsonl(path: Path, texts: int = 40, **columns) -> str:
    path.write_text("".join(json.dumps({"text": f"text {i} " * 4, **columns}) + "\n" for i in range(texts)))
    return str(path)


def test_glob_that_matches_nothing(capsys, run_dir, tmp_path):
    refused(capsys, ["--train_file", f"{jsonl(tmp_path / 'a.jsonl')},{tmp_path}/shards/*.jsonl", *into(run_dir)],
            f"train_file pattern '{tmp_path}/shards/*.jsonl' matches no file (relative paths start at ",
            folder=run_dir)


def test_missing_file_in_a_list(capsys, run_dir, tmp_path):
    refused(capsys, ["--train_file", f"{jsonl(tmp_path / 'a.jsonl')},{tmp_path / 'b.jsonl'}", *into(run_dir)],
            f"train_file '{tmp_path / 'b.jsonl'}' does not exist", folder=run_dir)


def test_domain_entry_with_an_unsupported_format(capsys, run_dir, tmp_path):
    (tmp_path / "notes.docx").write_text("text")
    refused(capsys, ["--train_file", f"prose={jsonl(tmp_path / 'a.jsonl')},code={tmp_path / 'notes.docx'}",
                     *into(run_dir)], f"train_file 'code={tmp_path / 'notes.docx'}': unsupported extension '.docx'; "
            "use .txt, .text, .json, .jsonl, .parquet, .csv", folder=run_dir)


def test_domain_named_twice(capsys, run_dir):
    refused(capsys, ["--domains", "code,prose,code", *into(run_dir)],
            "domains 'code,prose,code' names code more than once; give each domain once", folder=run_dir)


def test_shell_expanded_glob(capsys, run_dir, tmp_path):
    files = [jsonl(tmp_path / f"{name}.jsonl") for name in "ab"]
    with pytest.raises(SystemExit) as exit_:
        train.main([*QUICK, "--train_file", *files, *into(run_dir)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"unrecognized arguments: {files[1]}; these look like files of a glob the shell expanded: quote the glob "
        "(--train_file 'data/*.jsonl') or join the files with commas")


# Streaming -----------------------------------------------------------------------------------------------------

def test_streaming_the_built_in_corpus(capsys, run_dir):
    refused(capsys, ["--streaming", *into(run_dir)], "--streaming reads --train_file or --dataset_name; the built-in "
            "corpus is made in memory and needs no stream: drop --streaming, or give --train_file", folder=run_dir)


def test_streaming_without_eval_texts(capsys, run_dir, tmp_path):
    refused(capsys, ["--streaming", "--train_file", jsonl(tmp_path / "a.jsonl"), "--streaming_validation_texts", "0",
                     *into(run_dir)], "--streaming with --streaming_validation_texts 0 leaves nothing to evaluate on: "
            "give a --validation_file, or hold out some texts (--streaming_validation_texts 1000)", folder=run_dir)


def test_streaming_a_domain_column_without_its_list(capsys, run_dir, tmp_path):
    refused(capsys, ["--streaming", "--train_file", jsonl(tmp_path / "a.jsonl", domain="web"),
                     "--streaming_validation_texts", "5", *into(run_dir)],
            "--streaming: the training texts have a `domain` column, whose values a stream cannot list before reading "
            "all of it; pass them with --domains (such as --domains code,prose)", folder=run_dir)


def test_resuming_a_run_with_streaming_switched(capsys, run_dir, tmp_path):
    refused(capsys, ["--streaming", "--train_file", jsonl(tmp_path / "a.jsonl"), "--streaming_validation_texts", "5",
                     *resume(run_dir)], f"{run_dir / 'checkpoints' / 'global_step1'} was saved by a run without "
            "--streaming, this run is with it: a position in a stream and one in packed blocks do not translate into "
            "each other; pass --streaming false to continue it", folder=run_dir)


def test_data_file_that_does_not_exist(capsys, run_dir, tmp_path):
    refused(capsys, ["--validation_file", str(tmp_path / "eval.txt"), "--train_file", str(tmp_path / "train.txt"),
                     *into(run_dir)], f"validation_file '{tmp_path / 'eval.txt'}' does not exist", folder=run_dir)


# Model folders -------------------------------------------------------------------------------------------------

TINY_LLAMA = {"model_type": "llama", "vocab_size": 257, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}


def model_folder(tmp_path: Path, config: dict | None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_model_folder_without_weights(capsys, run_dir, tmp_path):
    folder = model_folder(tmp_path, TINY_LLAMA)
    refused(capsys, ["--model_name_or_path", str(folder), *into(run_dir)],
            f"has config.json but no weights (model.safetensors or pytorch_model.bin); copy the weights into it, or "
            f"pass --model_config {folder / 'config.json'} instead", folder=run_dir)


def test_model_folder_without_config(capsys, run_dir, tmp_path):
    folder = model_folder(tmp_path, None)
    refused(capsys, ["--model_name_or_path", str(folder), *into(run_dir)], "has no config.json; give a folder "
            "written by save_pretrained", folder=run_dir)


def test_unsupported_model_family(capsys, run_dir, tmp_path):
    folder = model_folder(tmp_path, {**TINY_LLAMA, "model_type": "bert"})
    last = refused(capsys, ["--model_name_or_path", str(folder), *into(run_dir)], "model type 'bert': no child of "
                   "its block (BertLayer", folder=run_dir)
    assert "ARCHITECTURES" in last and str(folder) in last


def test_unknown_model_type(capsys, run_dir, tmp_path):
    folder = model_folder(tmp_path, {**TINY_LLAMA, "model_type": "not-a-family"})
    refused(capsys, ["--model_name_or_path", str(folder), *into(run_dir)], "model type 'not-a-family' (",
            folder=run_dir)


def test_vocabulary_smaller_than_the_tokenizer(capsys, run_dir, tmp_path):
    config = model_folder(tmp_path, {**TINY_LLAMA, "vocab_size": 100}) / "config.json"
    refused(capsys, ["--model_config", str(config), *into(run_dir)],
            "the model's vocabulary (100) is smaller than the tokenizer's (257)", folder=run_dir)


def test_model_config_that_does_not_exist(capsys, run_dir):
    refused(capsys, ["--model_config", "tiny-lama", *into(run_dir)],
            "model_config 'tiny-lama' is neither a built-in preset", folder=run_dir)


# Checkpoints ---------------------------------------------------------------------------------------------------

def resume(run: Path, spec: str = "latest") -> list[str]:
    return ["--output_dir", str(run), "--resume_from_checkpoint", spec]


CHECKPOINT_CASES = {
    "another_model": (["--model_config", "tiny-qwen3"], "holds another model than this run builds (model_type llama "
                      "there, qwen3 here); it was trained from 'tiny-llama'"),
    "another_expert_count": (["--num_experts", "8"], "was trained with --num_experts 4, this run has --num_experts 8; "
                             "pass --num_experts 4 to continue it"),
    "another_top_k": (["--top_k", "1"], "was trained with --top_k 2, this run has --top_k 1; pass --top_k 2"),
    "shared_experts_added": (["--num_shared_experts", "1"], "was trained with --num_shared_experts 0, this run has "
                             "--num_shared_experts 1; pass --num_shared_experts 0"),
    "other_moe_blocks": (["--moe_layers", "1,3"], "has MoE layers in blocks [0, 1, 2, 3], --moe_layers 1,3 gives "
                         "[1, 3]; pass --moe_layers 0,1,2,3"),
    "other_expert_width": (["--expert_init", "granular", "--granularity", "2"], "holds experts of the dense FFN's "
                           "width, this run builds experts of 1/2 of the dense FFN's width (--expert_init granular "
                           "--granularity 2); pass an --expert_init other than granular to continue it"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_of_another_run(case, capsys, run_dir):
    flags, expected = CHECKPOINT_CASES[case]
    refused(capsys, [*flags, *resume(run_dir)], expected, folder=run_dir)


@pytest.mark.parametrize("imported", [False, True])
def test_a_checkpoint_with_our_layers_resumed_on_an_moe_folder(imported, capsys, run_dir, hf_moe_folder, tmp_path):
    """The Mixtral export of run_dir continues in place; run_dir's checkpoint (a Llama with our MoE layers) does not
    fit it. A run that an earlier version imported from that folder is told to export and continue the export."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    if imported:
        record = json.loads((copy / "run_config.json").read_text())
        record["resolved"]["imported_from"] = str(hf_moe_folder)
        (copy / "run_config.json").write_text(json.dumps(record))
    expected = (f"holds a llama model with our MoE layers (trained from "
                f"{str(hf_moe_folder) if imported else 'tiny-llama'!r}), and this run continues {hf_moe_folder} in "
                "place, in its own class, which that checkpoint does not fit: ")
    expected += (f"export the checkpoint (python -m moe_models.export --checkpoint {copy / 'checkpoints'} --tag "
                 "global_step1 --output HF_DIR)" if imported else "resume with the settings it was trained with")
    refused(capsys, ["--model_name_or_path", str(hf_moe_folder), *resume(copy)], expected, folder=copy)


def test_truncated_checkpoint_file(capsys, run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    victim = copy / "checkpoints" / "global_step1" / "layer_1_expert_2_mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    refused(capsys, resume(copy), f"checkpoint file {victim} is truncated or corrupt", folder=copy)


def test_checkpoints_folder_without_latest(capsys, run_dir, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", copy)
    (copy / "latest").unlink()
    refused(capsys, [*resume(run_dir, str(copy))], f"has no `latest` file (it is written after the first complete "
            f"save); pass a tag folder instead, e.g. --resume_from_checkpoint {copy / 'global_step1'}", folder=run_dir)


def test_incomplete_checkpoint(capsys, run_dir, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", copy)
    (copy / "global_step1" / "complete.json").unlink()
    refused(capsys, resume(run_dir, str(copy / "global_step1")),
            "global_step1 is incomplete (no complete.json: its save was interrupted)", folder=run_dir)


def test_checkpoint_that_does_not_exist(capsys, run_dir):
    refused(capsys, resume(run_dir, str(run_dir / "checkpoints" / "global_step7")),
            "does not exist; give 'latest', a checkpoints folder or a tag folder", folder=run_dir)


# Launches ------------------------------------------------------------------------------------------------------

def test_ep_size_not_dividing_the_world_size(capsys, run_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what the launcher sets for 3 ranks; refused before any group is joined
    refused(capsys, ["--ep_size", "2", *into(run_dir)],
            "ep_size (2) must divide the number of ranks (3): use an ep_size that divides 3", folder=run_dir)


def test_num_experts_not_divisible_by_ep_size(capsys, run_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    refused(capsys, ["--num_experts", "6", "--ep_size", "4", *into(run_dir)],
            "num_experts (6) must be divisible by ep_size (4): pick num_experts as a multiple of 4", folder=run_dir)


def launched(command: list[str], timeout: int = 120, **env: str) -> str:
    code, output = finish(start(command, **env), timeout)
    assert code != 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    return output


@pytest.mark.distributed
def test_ranks_given_different_flags(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = snapshot(copy)
    output = launched([*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "tests/scripts/rank_flags.py",
                       *QUICK, "--output_dir", str(copy), "--overwrite_output_dir", "--", "--learning_rate", "0.002"])
    assert output.count("rank 1 was given other settings than rank 0: --learning_rate 0.002 (rank 0: 0.001)") == 1
    assert "every rank must get the same flags" in output
    assert snapshot(copy) == before


@pytest.mark.distributed
def test_hostfile_line_without_slots(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost\n")
    output = launched(["launch/multi_node_hostfile.sh", str(hostfile), *QUICK, "--output_dir", str(tmp_path / "run")],
                      MASTER_PORT=str(free_port()), LAUNCHER_ARGS="--no_ssh_check")
    assert "slots=" in output.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


# Refusals that leave a run folder or an export target as it was -------------------------------------------------

def copied(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_resume_with_the_other_expert_path_is_refused_before_anything_is_built(capsys, run_dir):
    refused(capsys, ["--moe_impl", "deepspeed", *resume(run_dir), "--max_steps", "2"],
            "was saved with 1 ranks, ep_size 1 and --moe_impl grouped, this run has 1 ranks, ep_size 1 and --moe_impl "
            "deepspeed", folder=run_dir)


def test_resume_at_another_world_size_is_refused_before_anything_is_built(capsys, run_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what the launcher sets for 2 ranks; refused before any group is joined
    printed = []
    monkeypatch.setattr(StartupLines, "say", lambda self, text: printed.append(text))
    refused(capsys, [*resume(run_dir), "--max_steps", "2"], "was saved with 1 ranks, ep_size 1 and --moe_impl "
            "grouped, this run has 2 ranks, ep_size 1 and --moe_impl grouped", folder=run_dir)
    assert printed[0].startswith("imports ") and not any(  # refused at the settings check, before any build
        line.startswith(("settings checked", "process group", "model", "engine")) for line in printed), printed


def test_resume_of_a_run_whose_record_does_not_parse(capsys, run_dir, tmp_path):
    copy = copied(run_dir, tmp_path)
    (copy / "run_config.json").write_text('{"moe": {"num_experts": 4},')
    refused(capsys, [*resume(copy), "--max_steps", "2"], f"{copy / 'run_config.json'} is not valid JSON", folder=copy)


def test_resume_past_max_steps(capsys, run_dir, tmp_path):
    copy = copied(run_dir, tmp_path)
    (copy / "checkpoints" / "global_step1").rename(copy / "checkpoints" / "global_step3")  # a run that went further
    (copy / "checkpoints" / "latest").write_text("global_step3")
    refused(capsys, resume(copy), f"{copy / 'checkpoints' / 'global_step3'} is at step 3, past --max_steps 1: "
            "resuming would train nothing; pass a --max_steps above 3 to train further", folder=copy)


def test_resume_at_max_steps_says_there_is_nothing_to_train(capsys, run_dir):
    before = snapshot(run_dir)
    summary = train.main([*QUICK, *resume(run_dir)])
    out, err = capsys.readouterr()
    assert summary["trained_steps"] == 0 and "Traceback" not in out + err
    assert out.strip().splitlines()[-1] == (f"Nothing to train: {run_dir / 'checkpoints' / 'global_step1'} is at step "
                                            "1, which is --max_steps; the run is finished (pass a --max_steps above 1 "
                                            "to train further)")
    assert snapshot(run_dir) == before


ROUTING_CASES = {
    "score_function": (["--score_function", "sigmoid"], "was trained with --score_function softmax, this run has "
                       "--score_function sigmoid: that changes how tokens are routed from here on; pass "
                       "--score_function softmax (or leave it out) to continue it as it was trained, or "
                       "--allow_routing_change to change it"),
    "capacity_factor": (["--capacity_factor", "2.0"], "was trained with --capacity_factor 1.0, this run has "
                        "--capacity_factor 2.0"),
    "aux_loss_free_bias": (["--router_bias_update_rate", "0.001"], "was trained with --router_bias_update_rate 0.0"),
}


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_routing_rule_changed_on_resume(case, capsys, run_dir):
    flags, expected = ROUTING_CASES[case]
    refused(capsys, [*flags, *resume(run_dir), "--max_steps", "2"], expected, folder=run_dir)


def exported(run_dir: Path, output: Path, *flags: str) -> tuple[int, str]:
    from moe_models import export
    try:
        export.main(["--checkpoint", str(run_dir / "checkpoints"), "--output", str(output), *flags])
    except SystemExit as exit_:
        return exit_.code, ""
    return 0, ""


def export_refused(capsys, run_dir: Path, output: Path, expected: str, *flags: str) -> None:
    before = snapshot(output) if output.is_dir() else None
    file_before = output.read_bytes() if output.is_file() else None
    code, _ = exported(run_dir, output, *flags)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert expected in err.strip().splitlines()[-1], err[-3000:]
    assert (snapshot(output) if output.is_dir() else output.read_bytes() if output.is_file() else None) == \
        (before if before is not None else file_before)


def test_export_into_a_folder_of_the_users_own_files(capsys, run_dir, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"the user's own weights")
    (target / "notes.txt").write_text("keep me")
    export_refused(capsys, run_dir, target, f"--output {target} holds other files (model.safetensors, notes.txt), "
                   "not an exported model: choose a new or empty folder", "--overwrite")


def test_export_onto_a_file(capsys, run_dir, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"a file")
    export_refused(capsys, run_dir, target, f"--output {target} is a file; give a folder to export into")


# Writes that fail: the real target made unwritable (chattr +i works for root too) --------------------------------

@contextmanager
def unwritable(path: Path):
    """``path`` made immutable (no file can be created, changed or removed in it, even by root), then restored."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_output_folder_is_refused_before_anything_is_built(capsys, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    with unwritable(parent):
        last = refused(capsys, ["--output_dir", str(parent / "run")], f"--output_dir '{parent / 'run'}' cannot be "
                       f"written (its nearest existing folder {parent}): Operation not permitted")
    assert "fix its permissions or choose another --output_dir" in last


def test_unwritable_data_cache_is_refused_before_anything_is_built(capsys, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    with unwritable(cache):
        refused(capsys, ["--data_cache_dir", str(cache), "--output_dir", str(tmp_path / "run")],
                f"--data_cache_dir '{cache}' cannot be written: Operation not permitted")
    assert not (tmp_path / "run").exists()


def test_checkpoint_save_into_an_unwritable_folder_is_caught(capsys, tmp_path):
    tag = tmp_path / "run" / "checkpoints" / "global_step1"  # torch.save's write fails there (a RuntimeError)
    tag.mkdir(parents=True)
    with unwritable(tag):
        last = refused(capsys, ["--output_dir", str(tmp_path / "run"), "--save_steps", "1"],
                       f"saving checkpoint {tag} failed on 1 of 1 ranks")
    assert "no earlier checkpoint is still the latest complete checkpoint" in last
    assert not (tag.parent / "latest").exists()


def test_unwritable_metrics_file_on_resume_is_caught(capsys, run_dir, tmp_path):
    copy = copied(run_dir, tmp_path)
    with unwritable(copy / "metrics.jsonl"):  # the folder is writable; the trimmed file cannot replace the old one
        refused(capsys, [*resume(copy), "--max_steps", "2"], f"cannot write the metrics file {copy / 'metrics.jsonl'}",
                folder=copy)


def test_export_into_an_unwritable_folder(capsys, run_dir, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    with unwritable(parent):
        export_refused(capsys, run_dir, parent / "hf", f"--output '{parent / 'hf'}' cannot be written (its nearest "
                       f"existing folder {parent}): Operation not permitted")


# Garbage in, refused: texts, given flags, empty flags, library errors --------------------------------------------

TEXT_CASES = {
    "all_null": ([{"text": None}] * 40, "every value of column 'text' is null: there is no text to train on"),
    "all_empty": ([{"text": ""}] * 40, "every value of column 'text' is empty: there is no text to train on"),
    "numbers": ([{"text": 7}] * 40, "column 'text' holds int64 values, not text; pass --text_column"),
    "chat_messages": ([{"text": [{"role": "user", "content": "hi"}]}] * 40,
                      "column 'text' holds lists or records (chat messages?), not text"),
}


@pytest.mark.parametrize("case", TEXT_CASES)
def test_text_column_without_text(case, capsys, run_dir, tmp_path):
    rows, expected = TEXT_CASES[case]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    refused(capsys, ["--train_file", str(path), *into(run_dir)], f"{path}: {expected}", folder=run_dir)


def test_streamed_text_column_of_numbers(capsys, run_dir, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(40)))
    refused(capsys, ["--streaming", "--train_file", str(path), "--streaming_validation_texts", "5", *into(run_dir)],
            "column 'text' holds int values, not text", folder=run_dir)


@pytest.mark.parametrize("flag", ["--output_dir", "--model_name_or_path", "--train_file"])
def test_empty_flag_value(flag, capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty --output_dir would have meant this folder
    refused(capsys, [*into(run_dir), flag, ""], f"{flag} is empty (''): give a value, or leave the flag out")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def hf_moe_folder(run_dir, tmp_path_factory):
    """run_dir exported as a Mixtral folder (4 experts, top-2)."""
    output = tmp_path_factory.mktemp("hf-moe") / "mixtral"
    assert exported(run_dir, output)[0] == 0
    return output


def test_a_routing_flag_for_an_moe_in_place_is_refused(capsys, run_dir, hf_moe_folder):
    refused(capsys, ["--model_name_or_path", str(hf_moe_folder), *into(run_dir), "--num_experts", "8"],
            f"--num_experts: {hf_moe_folder} is continued in place (mixtral), with the family's own routing, balance "
            "loss and experts; leave it out", folder=run_dir)


def test_a_flag_given_at_the_folders_own_value_is_still_refused(capsys, run_dir, hf_moe_folder):
    # QUICK gives --num_experts 4, the folder's own count: refused as given, not compared
    refused(capsys, ["--model_name_or_path", str(hf_moe_folder), *into(run_dir)],
            f"--num_experts: {hf_moe_folder} is continued in place (mixtral)", folder=run_dir)


def test_the_stock_deepspeed_layer_for_an_moe_in_place_is_refused(capsys, run_dir, tmp_path):
    """A Qwen3-MoE folder made by transformers with --moe_impl deepspeed: in place, its experts run grouped."""
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = tmp_path / "qwen3-moe"
    config = AutoConfig.for_model("qwen3_moe", vocab_size=257, hidden_size=64, intermediate_size=128,
                                  moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                  norm_topk_prob=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    quick = QUICK[2:]  # without its --num_experts, which in place is refused first
    assert "--num_experts" not in quick
    refused(capsys, ["--model_name_or_path", str(folder), "--tokenizer_name", str(run_dir / "tokenizer"),
                     "--moe_impl", "deepspeed", *into(run_dir)],
            f"--moe_impl deepspeed: {folder} is continued in place (qwen3_moe), its experts run grouped in the "
            "family's own block; leave the flag out", folder=run_dir, base=quick)


@pytest.mark.parametrize("section, key", [("optimizer", "betaz"), ("scheduler", "warmup_stepz")])
def test_deepspeed_json_parameter_the_class_does_not_take(section, key, capsys, run_dir, tmp_path):
    path = ds_file(tmp_path, lambda c: c[section]["params"].update({key: 1}))
    refused(capsys, ["--deepspeed", path, *into(run_dir)], f"{section}.params.{key} in the DeepSpeed config {path}: "
            f"{section} ", folder=run_dir)


def test_model_folder_whose_weights_do_not_fit_its_config(capsys, run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})) \
        .save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    refused(capsys, ["--model_name_or_path", str(folder), "--tokenizer_name", str(run_dir / "tokenizer"), *into(run_dir)],
            f"the weights in '{folder}' have other "
            "shapes than its config.json says", folder=run_dir)


def test_routing_flag_left_out_on_resume_is_taken_from_the_run(run_dir, tmp_path):
    from moe_models.training.resumable import resumed_settings
    copy = copied(run_dir, tmp_path)
    record = json.loads((copy / "run_config.json").read_text())
    record["moe"]["capacity_factor"] = 2.0  # as if the run had been trained with --capacity_factor 2.0
    (copy / "run_config.json").write_text(json.dumps(record))
    cfg, taken = resumed_settings(parse_args([*QUICK, *resume(copy)]))
    assert cfg.moe.capacity_factor == 2.0 and taken == ["--capacity_factor 2.0"]
    given, taken = resumed_settings(parse_args([*QUICK, *resume(copy), "--capacity_factor", "1.0",
                                                "--allow_routing_change"]))
    assert given.moe.capacity_factor == 1.0 and taken == []


def test_resume_refusal_of_a_recorded_routing_setting_says_where_it_came_from(capsys, run_dir, tmp_path):
    """A run recorded with --score_function sigmoid, resumed with --moe_impl deepspeed: the sigmoid rule is the run's,
    not a flag of this command, and the refusal says so and names the record."""
    copy = copied(run_dir, tmp_path)
    record = json.loads((copy / "run_config.json").read_text())
    record["moe"]["score_function"] = "sigmoid"  # as if the run had been trained with --score_function sigmoid
    (copy / "run_config.json").write_text(json.dumps(record))
    refused(capsys, ["--moe_impl", "deepspeed", "--reset_optimizer", *resume(copy), "--max_steps", "2"],
            "--score_function sigmoid: the stock DeepSpeed gate (--moe_impl deepspeed) routes by softmax top-k with its "
            "own balance loss only; use --moe_impl grouped (the default), which keeps the same DeepSpeed layer and "
            f"checkpoint names (score_function sigmoid: the resumed run's setting, from {copy / 'run_config.json'}, "
            "not a flag you passed)", folder=copy)


def test_a_run_started_with_the_old_routing_defaults_resumes_with_them(run_dir, tmp_path):
    """Runs started before the defaults became dropless and deterministic recorded drop_tokens and
    top2_2nd_expert_sampling true: they continue so, not with today's defaults."""
    from moe_models.training.resumable import resumed_settings
    copy = copied(run_dir, tmp_path)
    record = json.loads((copy / "run_config.json").read_text())
    record["moe"].update(drop_tokens=True, top2_2nd_expert_sampling=True)
    (copy / "run_config.json").write_text(json.dumps(record))
    fresh = parse_args(QUICK).moe
    assert (fresh.drop_tokens, fresh.top2_2nd_expert_sampling) == (False, False)  # today's defaults
    cfg, taken = resumed_settings(parse_args([*QUICK, *resume(copy)]))
    assert (cfg.moe.drop_tokens, cfg.moe.top2_2nd_expert_sampling) == (True, True)
    assert taken == ["--drop_tokens true", "--top2_2nd_expert_sampling true"]


def test_allow_routing_change_lets_the_resume_through_the_checks(run_dir):
    from moe_models.training.resumable import check_resumable
    check_resumable(parse_args([*QUICK, *resume(run_dir), "--max_steps", "2", "--score_function", "sigmoid",
                                "--allow_routing_change"]), world_size=1)
