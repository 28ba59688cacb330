"""Packed blocks cached by content: a second preparation of the same data and tokenizer skips tokenising; the key
follows the files' bytes (not their path or time), the tokenizer and the settings."""

import json
import os
import shutil

import pytest

from moe_models.run.config import DataConfig
from moe_models.data import prepare
from moe_models.data.cache import cache_root
from moe_models.data.prepare import prepare_data
from moe_models.models.tokenization import byte_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"text number {i} " * 3}) + "\n" for i in range(200)))
    return path


@pytest.fixture
def builds(monkeypatch):
    """How many times the text was read and tokenised."""
    calls = []
    real = prepare.load_text_datasets

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(prepare, "load_text_datasets", counted)
    return calls


def prepared(path, tmp_path, tokenizer, **settings):
    data = DataConfig(train_file=str(path), block_size=16, data_cache_dir=str(tmp_path / "cache"), **settings)
    return prepare_data(data, tokenizer, seed=0)


def test_the_second_run_loads_the_blocks_instead_of_tokenising(corpus, tmp_path, tokenizer, builds):
    first = prepared(corpus, tmp_path, tokenizer)
    second = prepared(corpus, tmp_path, tokenizer)
    assert len(builds) == 1 and (first.cache["hit"], second.cache["hit"]) == (False, True)
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.validation["input_ids"] == first.validation["input_ids"]
    entry = json.loads((tmp_path / "cache" / os.path.basename(second.cache["entry"]) / "entry.json").read_text())
    assert entry["key"]["block_size"] == 16 and entry["meta"] == {"domains": []}


def test_a_copy_or_a_touched_file_hits_changed_bytes_miss(corpus, tmp_path, tokenizer, builds):
    prepared(corpus, tmp_path, tokenizer)
    copy = tmp_path / "copy" / "data.jsonl"
    copy.parent.mkdir()
    shutil.copy(corpus, copy)
    os.utime(copy, (1, 1))
    assert prepared(copy, tmp_path, tokenizer).cache["hit"] and len(builds) == 1
    copy.write_text(copy.read_text().replace("number 7 ", "number 8 ", 1))
    assert not prepared(copy, tmp_path, tokenizer).cache["hit"] and len(builds) == 2


def test_the_tokenizer_and_the_settings_are_part_of_the_key(corpus, tmp_path, tokenizer, builds):
    prepared(corpus, tmp_path, tokenizer)
    other = byte_level_tokenizer()
    other.add_tokens(["number"])
    assert not prepared(corpus, tmp_path, other).cache["hit"]
    assert not prepared(corpus, tmp_path, tokenizer, validation_split_percentage=10).cache["hit"]
    assert not prepared(corpus, tmp_path, tokenizer, domains="a,b").cache["hit"]
    assert not prepared(corpus, tmp_path, tokenizer, text_column="text", preprocessing_num_workers=2).cache["hit"]
    assert len(builds) == 5 and len(list((tmp_path / "cache").iterdir())) == 5


def test_a_failed_store_leaves_no_entry_and_a_damaged_one_is_rebuilt(corpus, tmp_path, tokenizer, builds, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr("datasets.DatasetDict.save_to_disk", full_disk)
        result = prepared(corpus, tmp_path, tokenizer)
    assert len(result.train) > 0 and list((tmp_path / "cache").iterdir()) == []
    entry = prepared(corpus, tmp_path, tokenizer).cache["entry"]
    shutil.rmtree(f"{entry}/blocks/train")
    again = prepared(corpus, tmp_path, tokenizer)
    assert not again.cache["hit"] and len(again.train) == len(result.train) and len(builds) == 3


def test_the_cache_folder_comes_from_the_flag_the_environment_or_home(monkeypatch):
    monkeypatch.setenv("MOE_MODELS_DATA_CACHE", "/somewhere")
    assert str(cache_root("/flag")) == "/flag" and str(cache_root(None)) == "/somewhere"
    monkeypatch.delenv("MOE_MODELS_DATA_CACHE")
    assert cache_root(None) == cache_root("~/.cache/moe_models/data") and "~" not in str(cache_root(None))
