"""The catalogue of bad inputs: each one ends the run with a non-zero exit and a last line that says what is wrong
and how to fix it, with no Python traceback, in seconds, and before anything in an existing run folder changes.
docs/troubleshooting.md lists the messages.

Most cases run train.main in this process; the launch cases that need several ranks use the real launcher.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import train
from helpers import LAUNCHER, finish, free_port, start
from moe_models.run.cli import parse_args
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


def refused(capsys, args: list[str], expected: str, folder: Path | None = None) -> str:
    """Run train.main(QUICK + args); it must exit non-zero without a traceback, its last stderr line must hold
    ``expected``, and ``folder`` (an existing run) must be byte-identical afterwards."""
    before = snapshot(folder) if folder else None
    with pytest.raises(SystemExit) as exit_:
        train.main([*QUICK, *args])
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
