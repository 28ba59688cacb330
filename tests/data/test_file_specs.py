"""--train_file / --validation_file with several files, globs and per-domain entries; loading them (map-style)."""

import json
import os

import pytest

from moe_models.run.config import DataConfig
from moe_models.data.file_specs import DataFile, data_files, entries, resolve_files
from moe_models.data.text import data_problems, load_text_datasets


def write_jsonl(path, texts, **columns) -> str:
    path.write_text("".join(json.dumps({"text": text, **columns}) + "\n" for text in texts))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """data/a.jsonl, data/b.jsonl, data/c.txt, extra.txt."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "b.jsonl", ["b one", "b two"])
    write_jsonl(data / "a.jsonl", ["a one", "a two"])
    (data / "c.txt").write_text("c one\nc two\n")
    (tmp_path / "extra.txt").write_text("extra one\n")
    return tmp_path


def test_comma_separated_files_and_globs_in_order(corpus):
    files = data_files("train_file", f"{corpus}/data/*.jsonl,{corpus}/extra.txt")
    assert files == [DataFile(f"{corpus}/data/a.jsonl", "json"), DataFile(f"{corpus}/data/b.jsonl", "json"),
                     DataFile(f"{corpus}/extra.txt", "text")]


def test_domain_entries_name_every_file_they_match(corpus):
    files = data_files("train_file", f"code={corpus}/data/*.jsonl, prose={corpus}/data/c.txt")
    assert [(f.path.rsplit("/", 1)[1], f.domain) for f in files] == [("a.jsonl", "code"), ("b.jsonl", "code"),
                                                                     ("c.txt", "prose")]


def test_a_path_that_holds_an_equals_sign_is_a_path(tmp_path, monkeypatch):
    odd = tmp_path / "lang=en.jsonl"
    write_jsonl(odd, ["x"])
    assert entries(str(odd)) == [(None, str(odd))]  # the part before "=" holds "/": not a domain name
    monkeypatch.chdir(tmp_path)
    assert entries("lang=en.jsonl") == [(None, "lang=en.jsonl")]  # exists as a whole
    assert entries("lang=missing.jsonl") == [("lang", "missing.jsonl")]


def test_every_entry_must_name_existing_supported_files(corpus):
    _, problems = resolve_files("train_file", f"{corpus}/data/*.parquet,{corpus}/missing.jsonl,"
                                f"code={corpus}/notes.docx,{corpus}/data/a.jsonl,")
    assert problems[0] == (f"train_file pattern '{corpus}/data/*.parquet' matches no file (relative paths start at "
                           f"{os.getcwd()}); check the folder and the extension")
    assert problems[1] == f"train_file '{corpus}/missing.jsonl' does not exist"
    assert problems[2] == f"train_file 'code={corpus}/notes.docx' does not exist"
    assert problems[3].startswith("train_file '")  # the empty entry after the last comma
    assert "has an empty entry" in problems[3]
    (corpus / "notes.docx").write_text("text")
    assert resolve_files("train_file", f"code={corpus}/notes.docx")[1] == [
        f"train_file 'code={corpus}/notes.docx': unsupported extension '.docx'; use .txt, .text, .json, .jsonl, "
        ".parquet, .csv"]
    with pytest.raises(ValueError, match="does not exist"):
        data_files("train_file", f"{corpus}/missing.jsonl")


def test_settings_check_lists_each_problem(corpus):
    problems = data_problems(DataConfig(train_file=f"{corpus}/nothing/*.jsonl",
                                        validation_file=f"{corpus}/data/a.jsonl,{corpus}/gone.txt"))
    assert len(problems) == 2 and "matches no file" in problems[0] and "gone.txt' does not exist" in problems[1]


def test_mixed_formats_load_in_order_with_file_domains(corpus):
    data = DataConfig(train_file=f"{corpus}/data/c.txt,code={corpus}/data/*.jsonl,{corpus}/extra.txt",
                      validation_file=f"prose={corpus}/extra.txt")
    loaded = load_text_datasets(data, seed=0)
    assert loaded["train"]["text"] == ["c one", "c two", "a one", "a two", "b one", "b two", "extra one"]
    assert loaded["train"]["domain"] == [None, None, "code", "code", "code", "code", None]
    assert loaded["validation"]["domain"] == ["prose"]


def test_a_domain_entry_overrides_the_files_domain_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["x", "y"], domain="web")
    other = write_jsonl(tmp_path / "b.jsonl", ["z"], domain="web")
    loaded = load_text_datasets(DataConfig(train_file=f"code={path},{other}", validation_file=other), seed=0)
    assert loaded["train"]["domain"] == ["code", "code", "web"]
