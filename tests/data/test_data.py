"""The synthetic corpus, file loading, block packing and per-rank batching (CPU, offline)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets / transformers read them at import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402

from moe_models.run.config import DataConfig  # noqa: E402
from moe_models.data.batches import TrainBatches, eval_batches  # noqa: E402
from moe_models.data.synthetic import FACT_DOMAINS as FACTS, DOMAINS, entropy_floor, synthetic_corpus  # noqa: E402
from moe_models.data.synthetic import synthetic_domain_problems  # noqa: E402
from moe_models.data.text import load_text_datasets, pack_blocks  # noqa: E402
from moe_models.models.tokenization import byte_level_tokenizer  # noqa: E402


FACT_DOMAINS = {domain.name: domain for domain in FACTS}


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


# --------------------------------------------------------------------------------------------- synthetic corpus


def _check_example(text: str, domain: str) -> None:
    """Each domain's examples have its format and a correct answer."""
    if domain == "arithmetic":
        a, b, total = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", text).groups())
        assert a + b == total
    elif domain == "sorting":
        digits, answer = re.fullmatch(r"sort ([\d ]+) -> ([\d ]+)", text).groups()
        assert sorted(digits.split()) == answer.split()
    elif domain == "brackets":
        prefix, closing = re.fullmatch(r"([()\[\]{}]+) -> ([)\]}]+)", text).groups()
        stack = []
        for char in prefix + closing:
            if char in "([{":
                stack.append(char)
            else:
                assert stack.pop() + char in ("()", "[]", "{}")
        assert not stack
    elif domain == "kv_recall":
        pairs, key, value = re.fullmatch(r"((?:k\d=[a-z] ?)+) \? (k\d) -> ([a-z])", text).groups()
        assert dict(pair.split("=") for pair in pairs.split())[key] == value
    elif domain == "prose":
        assert re.fullmatch(r"[A-Z][a-z ]+\.", text)
    else:
        fact = FACT_DOMAINS[domain]
        letters = f"[{fact.consonants}{fact.vowels}]+"
        name, attribute, value = re.fullmatch(f"({letters}) ([a-z]+) ({letters})", text).groups()
        assert attribute in fact.attributes


def test_synthetic_corpus_is_deterministic_per_seed():
    state = random.getstate()
    first, again, other = synthetic_corpus(200, seed=1), synthetic_corpus(200, seed=1), synthetic_corpus(200, seed=2)
    assert random.getstate() == state  # global RNG untouched
    assert first.column_names == ["text", "domain"]
    assert first.to_dict() == again.to_dict()
    assert first["text"] != other["text"]


def test_synthetic_corpus_mixes_all_domains_with_correct_tags():
    count = 100 * len(DOMAINS)
    corpus = synthetic_corpus(count, seed=0)
    assert len(corpus) == count
    assert len(DOMAINS) >= 8
    domains = corpus["domain"]
    assert {d: domains.count(d) for d in DOMAINS} == {d: 100 for d in DOMAINS}
    assert len(set(domains[:20])) >= 3  # interleaved, not grouped by domain
    for example in corpus:
        _check_example(example["text"], example["domain"])


def test_facts_never_change_across_examples_and_seeds():
    """A fact domain states fixed facts: every example about an (entity, attribute) gives the same value, in any seed's
    corpus, so held-out examples test what training showed."""
    values: dict[tuple[str, str, str], set[str]] = {}
    for seed in (0, 1):
        corpus = synthetic_corpus(4000, seed)
        for text, domain in zip(corpus["text"], corpus["domain"]):
            if domain in FACT_DOMAINS:
                name, attribute, value = text.split()
                values.setdefault((domain, name, attribute), set()).add(value)
    assert values and all(len(seen) == 1 for seen in values.values())
    # each domain's names are its own (disjoint letters), and many facts recur
    names = {domain: {name for d, name, _ in values if d == domain} for domain in FACT_DOMAINS}
    assert all(not (names[a] & names[b]) for a in names for b in names if a < b)
    assert all(len(n) > 50 for n in names.values())


def test_a_chosen_list_of_built_in_domains_generates_only_those():
    five = ("arithmetic", "sorting", "brackets", "kv_recall", "prose")
    corpus = synthetic_corpus(100, seed=3, domains=five)
    assert sorted(set(corpus["domain"])) == sorted(five)
    assert synthetic_domain_problems(",".join(five)) == []
    problem, = synthetic_domain_problems("prose,poetry")
    assert "'poetry' is not one" in problem and "geography" in problem
    assert synthetic_domain_problems("prose,prose")


def test_entropy_floor_matches_the_generators_written_out():
    """The floor per domain is (log of the number of domains + the generator's choices) per token, here computed from
    the texts alone: arithmetic draws two numbers below 100 (log 10^4), a fact picks one of its domain's entities and
    attributes; tokens are the UTF-8 bytes plus one end-of-text token."""
    num_examples, seed = 3000, 7
    corpus, floor = synthetic_corpus(num_examples, seed), entropy_floor(num_examples, seed)
    domain_nats = math.log(len(DOMAINS))

    def per_token(domain: str, nats_per_example: float) -> float:
        texts = [t for t, d in zip(corpus["text"], corpus["domain"]) if d == domain]
        return len(texts) * (domain_nats + nats_per_example) / sum(len(t.encode()) + 1 for t in texts)

    assert floor.by_domain["arithmetic"] == pytest.approx(per_token("arithmetic", math.log(100 * 100)))
    geography = FACT_DOMAINS["geography"]
    assert floor.by_domain["geography"] == pytest.approx(
        per_token("geography", math.log(geography.entities) + math.log(len(geography.attributes))))
    assert min(floor.by_domain.values()) < floor.nats_per_token < max(floor.by_domain.values())



# --------------------------------------------------------------------------------------------- loading files

ROWS = [{"content": f"document number {i}", "id": i, "domain": "prose"} for i in range(40)]


def _write(path, rows) -> str:
    """Write rows in the format that path's extension names; a .txt file holds one text per line."""
    frame = Dataset.from_list(rows)
    if path.suffix == ".txt":
        path.write_text("".join(row["content"] + "\n" for row in rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        frame.to_parquet(str(path))
    else:
        frame.to_csv(str(path), index=False)
    return str(path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet", ".csv"])
def test_load_each_file_type(tmp_path, suffix):
    train = _write(tmp_path / f"train{suffix}", ROWS)
    validation = _write(tmp_path / f"validation{suffix}", ROWS[:5])
    data = DataConfig(train_file=train, validation_file=validation, text_column="content")
    loaded = load_text_datasets(data, seed=0)
    assert list(loaded) == ["train", "validation"]
    assert loaded["train"]["content"] == [row["content"] for row in ROWS]
    assert loaded["validation"]["content"] == [row["content"] for row in ROWS[:5]]
    expected_columns = ["content"] if suffix == ".txt" else ["content", "domain"]  # "id" is dropped
    assert sorted(loaded["train"].column_names) == expected_columns


def test_held_out_validation_split_is_seeded_and_disjoint(tmp_path):
    data = DataConfig(train_file=_write(tmp_path / "train.jsonl", ROWS), text_column="content",
                      validation_split_percentage=10)
    loaded = load_text_datasets(data, seed=3)
    train, validation = set(loaded["train"]["content"]), set(loaded["validation"]["content"])
    assert len(validation) == 4 and len(train) == 36
    assert train | validation == {row["content"] for row in ROWS}
    assert load_text_datasets(data, seed=3)["validation"]["content"] == loaded["validation"]["content"]
    assert load_text_datasets(data, seed=4)["validation"]["content"] != loaded["validation"]["content"]


def test_synthetic_default_holds_out_validation():
    loaded = load_text_datasets(DataConfig(synthetic_examples=100, validation_split_percentage=5), seed=0)
    assert (len(loaded["train"]), len(loaded["validation"])) == (95, 5)
    assert loaded["train"].column_names == ["text", "domain"]


def test_missing_text_column_names_columns_and_flag(tmp_path):
    path = _write(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ValueError) as err:
        load_text_datasets(DataConfig(train_file=path, text_column="body"), seed=0)
    message = str(err.value)
    for part in ("'body'", path, "content", "id", "--text_column"):
        assert part in message


def test_unreachable_hub_dataset_suggests_train_file():
    with pytest.raises(ValueError, match="--train_file") as err:
        load_text_datasets(DataConfig(dataset_name="nobody/no_such_dataset"), seed=0)
    assert "not reachable" in str(err.value) or "reachable from this machine" in str(err.value)


# --------------------------------------------------------------------------------------------- packing


def test_blocks_are_the_concatenated_token_stream(tokenizer):
    raw = DatasetDict(train=Dataset.from_dict({"text": [f"text {i} " * (i % 7) for i in range(300)]}))
    packed = pack_blocks(raw, tokenizer, block_size=16, text_column="text")["train"]
    assert packed.column_names == ["input_ids"]
    stream = list(itertools.chain.from_iterable(
        tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in raw["train"]["text"]))
    assert len(packed) == len(stream) // 16
    assert all(len(block) == 16 for block in packed["input_ids"])
    assert list(itertools.chain.from_iterable(packed["input_ids"])) == stream[:len(packed) * 16]


def test_domain_ids_follow_each_token_to_its_example(tokenizer):
    corpus = synthetic_corpus(300, seed=5)
    unknown_first = corpus.map(lambda row, i: {"domain": "unknown" if i == 0 else row["domain"]}, with_indices=True)
    raw = DatasetDict(train=unknown_first)
    packed = pack_blocks(raw, tokenizer, block_size=32, text_column="text")["train"]
    expected = []
    for text, domain in zip(raw["train"]["text"], raw["train"]["domain"]):
        index = DOMAINS.index(domain) if domain in DOMAINS else -1
        expected += [index] * (len(tokenizer(text)["input_ids"]) + 1)
    domain_ids = list(itertools.chain.from_iterable(packed["domain_ids"]))
    assert all(len(block) == 32 for block in packed["domain_ids"])
    assert domain_ids == expected[:len(domain_ids)]
    assert domain_ids[0] == -1 and set(domain_ids) == set(range(len(DOMAINS))) | {-1}


def test_too_little_text_for_one_block(tokenizer):
    raw = DatasetDict(validation=Dataset.from_dict({"text": ["short"]}))
    with pytest.raises(ValueError, match=r"validation.*6 tokens.*--block_size"):
        pack_blocks(raw, tokenizer, block_size=64, text_column="text")


# --------------------------------------------------------------------------------------------- batching


def _numbered_blocks(count: int) -> Dataset:
    """Blocks whose tokens all equal the block's index, so a batch says which blocks it holds."""
    return Dataset.from_dict({"input_ids": [[i] * 4 for i in range(count)],
                              "domain_ids": [[i % len(DOMAINS)] * 4 for i in range(count)]})


def _block_numbers(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_train_batches_shape_and_rank_disjoint_cover():
    blocks = _numbered_blocks(40)
    ranks = [TrainBatches(blocks, batch_size=4, rank=r, world_size=2, seed=7) for r in range(2)]
    first = next(ranks[0])
    assert first["input_ids"].dtype == torch.long and first["input_ids"].shape == (4, 4)
    assert first["domain_ids"].shape == (4, 4)
    assert ranks[0].batches_per_epoch == 5
    seen = [_block_numbers(first) + [n for _ in range(4) for n in _block_numbers(next(ranks[0]))],
            [n for _ in range(5) for n in _block_numbers(next(ranks[1]))]]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))
    second_epoch = [n for _ in range(5) for n in _block_numbers(next(ranks[0]))]
    assert sorted(second_epoch) != second_epoch and second_epoch != seen[0]  # reshuffled every epoch


def test_train_batches_leave_global_rng_alone():
    state = torch.get_rng_state()
    batches = TrainBatches(_numbered_blocks(40), batch_size=4, rank=0, world_size=1, seed=0)
    for _ in range(12):
        next(batches)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("taken", [0, 3, 5, 7, 10])  # 5 batches per epoch: start, middle, edges, later epochs
def test_train_batches_resume_exactly(taken):
    blocks = _numbered_blocks(43)
    original = TrainBatches(blocks, batch_size=4, rank=1, world_size=2, seed=11)
    for _ in range(taken):
        next(original)
    resumed = TrainBatches(blocks, batch_size=4, rank=1, world_size=2, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for _ in range(8):  # crosses at least one epoch boundary
        expected, got = next(original), next(resumed)
        assert set(got) == set(expected)
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert resumed.state_dict() == original.state_dict()


def test_train_batches_resume_at_another_world_size_at_the_same_fraction_of_the_epoch():
    batches = TrainBatches(_numbered_blocks(40), batch_size=4, rank=0, world_size=1, seed=0)
    batches.resume(lambda rank: {"epoch": 2, "batches_in_epoch": 3}, saved_world=2)
    assert batches.state_dict() == {"epoch": 2, "batches_in_epoch": 6}
    with pytest.raises(ValueError, match="of a run with --streaming; resume it with --streaming"):
        batches.resume(lambda rank: {"epoch": 0, "text": 3, "offset": 0}, saved_world=1)


def test_train_batches_refuse_a_share_smaller_than_a_batch():
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainBatches(_numbered_blocks(10), batch_size=8, rank=0, world_size=2, seed=0)


def test_train_batches_refuse_a_state_from_another_setup():
    batches = TrainBatches(_numbered_blocks(40), batch_size=4, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="batches per epoch"):
        batches.load_state_dict({"epoch": 0, "batches_in_epoch": 6})


def test_eval_batches_shard_in_order_and_cap():
    blocks = _numbered_blocks(21)
    shards = [[n for batch in eval_batches(blocks, batch_size=4, rank=r, world_size=2) for n in _block_numbers(batch)]
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 11  # equal shares; one block repeated to even them out
    assert set(shards[0]) | set(shards[1]) == set(range(21))
    assert shards[0] == sorted(shards[0])
    capped = eval_batches(blocks, batch_size=4, rank=0, world_size=2, max_batches=2)
    assert [_block_numbers(batch) for batch in capped] == [shards[0][:4], shards[0][4:8]]
    assert len(list(capped)) == 2  # iterable again
