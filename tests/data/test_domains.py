"""Per-token domain_ids from per-domain files, a `domain` column or --domains, with the run's stable name list."""

import itertools
import json

import pytest
from datasets import DatasetDict

import train
from moe_models.run.config import DataConfig
from moe_models.data.domains import domains_problems, resolve_domains
from moe_models.data.prepare import map_style_domains, prepare_data
from moe_models.data.synthetic import DOMAINS
from moe_models.data.text import load_text_datasets, pack_blocks
from moe_models.models.tokenization import byte_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def write(path, texts, **columns) -> str:
    path.write_text("".join(json.dumps({"text": text, **columns}) + "\n" for text in texts))
    return str(path)


def test_the_list_comes_from_the_flag_else_file_names_then_sorted_column_values():
    assert resolve_domains(["b", "a"], ["x"], ["c"]) == ["b", "a"]
    assert resolve_domains(None, ["prose", "code"], ["web", "code", None, "blog"]) == ["prose", "code", "blog", "web"]
    assert resolve_domains(None, [], []) == []
    assert domains_problems("code,,prose") == ["domains 'code,,prose' has an empty name; give names separated by "
                                               "commas, such as code,prose"]
    assert domains_problems("a,b,a") == ["domains 'a,b,a' names a more than once; give each domain once"]


def test_per_domain_files_give_each_token_its_files_domain(tmp_path, tokenizer):
    code = write(tmp_path / "code.jsonl", [f"def f{i}(): return {i}" for i in range(30)])
    prose = write(tmp_path / "prose.jsonl", [f"The {i}th cat sat." for i in range(30)])
    web = write(tmp_path / "web.jsonl", [f"click here {i}" for i in range(30)], domain="web")
    data = DataConfig(train_file=f"prose={prose},code={code},{web}", validation_file=f"code={code}")
    raw = load_text_datasets(data, seed=0)
    domains = map_style_domains(data, raw)
    assert domains == ["prose", "code", "web"]  # the files' names in order, then the column's values
    packed = pack_blocks(DatasetDict(train=raw["train"]), tokenizer, 16, "text", domains=domains)["train"]
    expected = list(itertools.chain.from_iterable(
        [domains.index(domain)] * (len(tokenizer(text)["input_ids"]) + 1)
        for text, domain in zip(raw["train"]["text"], raw["train"]["domain"])))
    ids = list(itertools.chain.from_iterable(packed["domain_ids"]))
    assert ids == expected[:len(ids)] and set(ids) == {0, 1, 2}


def test_listed_domains_fix_the_ids_and_others_get_minus_one(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", ["alpha " * 10], domain="a")
    other = write(tmp_path / "b.jsonl", ["beta " * 10], domain="b")
    blocks = prepare_data(DataConfig(train_file=f"{path},{other}", validation_file=path, domains="b,z",
                                     block_size=8, data_cache_dir=str(tmp_path / "cache")), tokenizer, seed=0)
    assert blocks.domains == ["b", "z"]
    ids = set(itertools.chain.from_iterable(blocks.train["domain_ids"]))
    assert ids == {-1, 0}


def test_the_built_in_corpus_keeps_its_domains(tmp_path, tokenizer):
    prepared = prepare_data(DataConfig(synthetic_examples=200, block_size=16, data_cache_dir=str(tmp_path)),
                            tokenizer, seed=0)
    assert prepared.domains == list(DOMAINS)


def test_a_run_batches_domain_ids_and_records_the_list(world, tmp_path):
    code = write(tmp_path / "code.jsonl", [f"def f{i}(x): return x * {i}" for i in range(200)])
    (tmp_path / "prose.txt").write_text("".join(f"The {i}th cat sat on the mat.\n" for i in range(200)))
    out = tmp_path / "run"
    _, trainer = train.build(train.parse_args([
        "--num_experts", "4", "--max_steps", "1", "--block_size", "32", "--per_device_train_batch_size", "4",
        "--train_file", f"code={code},prose={tmp_path / 'prose.txt'}", "--output_dir", str(out)]))
    resolved = json.loads((out / "run_config.json").read_text())["resolved"]
    assert resolved["domains"] == ["code", "prose"]
    seen = set()
    for _ in range(10):
        batch = next(trainer.batches)
        assert batch["domain_ids"].shape == batch["input_ids"].shape
        seen |= set(batch["domain_ids"].flatten().tolist())
    assert seen == {0, 1}
