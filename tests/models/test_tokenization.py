"""The built-in byte-level tokenizer and loading a model's own (offline)."""

import pytest
from transformers import AutoTokenizer

from moe_models.run.config import ModelConfig
from moe_models.models.tokenization import BYTE_VOCAB_SIZE, byte_level_tokenizer, load_tokenizer

SAMPLE_TEXTS = ["hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "héllo wörld",
                "日本語のテキスト", "emoji 🤖🚀 mixed", "37+48=85", "", "<|endoftext|> inside"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def test_byte_tokenizer_shape(tokenizer):
    assert len(tokenizer) == BYTE_VOCAB_SIZE == 257
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 256
    assert tokenizer("x")["input_ids"] == tokenizer.encode("x", add_special_tokens=True)  # nothing added


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_byte_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    if "<|endoftext|>" not in text:
        assert len(ids) == len(text.encode("utf-8"))  # one token per byte
        assert all(0 <= i < 256 for i in ids)


def test_byte_tokenizer_is_deterministic_and_reloads_identically(tokenizer, tmp_path):
    assert byte_level_tokenizer().get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == BYTE_VOCAB_SIZE
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    for text in SAMPLE_TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_load_tokenizer_defaults_to_byte_level():
    assert len(load_tokenizer(ModelConfig())) == BYTE_VOCAB_SIZE


def test_load_tokenizer_from_folder_sets_missing_pad_to_eos(tmp_path):
    without_pad = byte_level_tokenizer()
    without_pad.pad_token = None
    without_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(model_name_or_path=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_load_tokenizer_failure_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(ValueError, match="--tokenizer_name") as err:
        load_tokenizer(ModelConfig(tokenizer_name=missing))
    assert missing in str(err.value)
