"""Upcycling from a model folder as users have them: save_pretrained's sharded safetensors and the model's own
tokenizer, for families found by inspection (a fused gate_up FFN, a plain FFN with biases, a GeGLU FFN), through
train.py on two ranks at ep_size 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, set_seed

from helpers import launch
from moe_models.data.synthetic import synthetic_corpus
from moe_models.models.probe import small_config

TOKENS = 300  # the folder's tokenizer: a BPE of 300 tokens, not the byte-level one of 257
EOS = "<eos>"


def folder_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained here, offline, on the synthetic corpus."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=TOKENS, special_tokens=[EOS, "<unk>"])
    backend.train_from_iterator(synthetic_corpus(300, 0)["text"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token="<unk>", pad_token=EOS)


def model_folder(model_type: str, folder: Path) -> Path:
    """A small dense model of the family, saved as sharded safetensors with its tokenizer beside it."""
    set_seed(0)
    config = small_config(AutoConfig.for_model(model_type))
    config.num_hidden_layers = 2
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="200KB")
    folder_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.distributed
@pytest.mark.parametrize("model_type", ["phi3", "starcoder2", "gemma"])
def test_upcycle_from_a_sharded_folder_with_its_tokenizer(model_type, tmp_path):
    folder = model_folder(model_type, tmp_path / "model")
    assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]  # sharded
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    out = tmp_path / "run"
    launch(["train.py", "--model_name_or_path", str(folder), "--ep_size", "2", "--num_experts", "4",
            "--max_steps", "2", "--warmup_steps", "1", "--synthetic_examples", "300", "--block_size", "32",
            "--per_device_train_batch_size", "2", "--eval_steps", "0", "--logging_steps", "1", "--disable_tqdm",
            "--output_dir", str(out)])
    assert len(AutoTokenizer.from_pretrained(out / "tokenizer")) == len(AutoTokenizer.from_pretrained(folder))
    assert len(AutoTokenizer.from_pretrained(folder)) == TOKENS
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    experts = {p.name for p in (out / "checkpoints" / "global_step2").glob("layer_*_expert_*_*.pt")}
    assert experts == {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)}
