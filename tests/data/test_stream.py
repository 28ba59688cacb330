"""--streaming: each rank's disjoint share, epochs, on-the-fly packing, exact resume (token ids compared directly),
the held-out eval texts and per-file domains (CPU, offline)."""

import itertools
import json
import random

import pytest
import torch
from datasets import Dataset

from moe_models.run.config import DataConfig
from moe_models.data.prepare import prepare_data
from moe_models.data.stream import open_stream
from moe_models.data.stream_batches import StreamBatches, pack
from moe_models.models.tokenization import byte_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def numbered_files(folder, count: int, texts_per_file: int, suffix: str = ".jsonl") -> list[str]:
    """Files f0, f1, ... whose texts name themselves: "<f2:17> ..." is text 17 of file 2."""
    paths = []
    for f in range(count):
        texts = [f"<f{f}:{i}> " + "word " * (i % 5) for i in range(texts_per_file)]
        path = folder / f"f{f}{suffix}"
        if suffix == ".txt":
            path.write_text("".join(text + "\n" for text in texts))
        elif suffix == ".jsonl":
            path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        else:
            getattr(Dataset.from_dict({"text": texts}), {".csv": "to_csv", ".parquet": "to_parquet"}[suffix])(
                str(path), **({"index": False} if suffix == ".csv" else {}))
        paths.append(str(path))
    return paths


def config(files: list[str], **settings) -> DataConfig:
    return DataConfig(train_file=",".join(files), streaming=True, **{"streaming_validation_texts": 4,
                                                                       "block_size": 16, **settings})


def share(data: DataConfig, tokenizer, rank: int, world_size: int, epoch: int = 0, seed: int = 0) -> list[str]:
    stream, _, _ = open_stream(data, tokenizer)
    return [text for text, _ in stream.for_rank(rank, world_size, seed, data.shuffle_buffer_size).texts(epoch)]


# ------------------------------------------------------------------------------------------------- ranks, epochs


@pytest.mark.parametrize("world_size", [1, 2, 3])  # 4 files: whole files per rank at 1 and 2, every 3rd text at 3
def test_ranks_read_disjoint_shares_that_cover_the_stream(tmp_path, tokenizer, world_size):
    data = config(numbered_files(tmp_path, 4, 25), shuffle_buffer_size=10)
    shares = [share(data, tokenizer, rank, world_size) for rank in range(world_size)]
    every = [text for shard in shares for text in shard]
    assert len(every) == len(set(every)) == 4 * 25 - 4
    held_out = {f"<f0:{i}> " + "word " * i for i in range(4)}
    assert set(every) == {f"<f{f}:{i}> " + "word " * (i % 5) for f in range(4) for i in range(25)} - held_out
    if world_size == 2:  # whole files: each rank's texts come from two files
        assert [len({text[2] for text in shard}) for shard in shares] == [2, 2]


def test_each_epoch_is_the_same_texts_in_a_new_seeded_order(tmp_path, tokenizer):
    data = config(numbered_files(tmp_path, 2, 30), shuffle_buffer_size=20)
    first, again = share(data, tokenizer, 0, 1, epoch=0), share(data, tokenizer, 0, 1, epoch=0)
    second = share(data, tokenizer, 0, 1, epoch=1)
    assert first == again and sorted(first) == sorted(second) and first != second
    assert share(data, tokenizer, 0, 1, seed=1) != first
    unshuffled = config(numbered_files(tmp_path, 2, 30), shuffle_buffer_size=0)
    assert share(unshuffled, tokenizer, 0, 1, epoch=0) == share(unshuffled, tokenizer, 0, 1, epoch=3)


def test_mixed_formats_stream_in_the_order_given(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("".join(f"<a{i}> some text\n" for i in range(5)))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "<b0> some text"}) + "\n")
    Dataset.from_dict({"text": [f"<c{i}> some text" for i in range(3)]}).to_csv(str(tmp_path / "c.csv"), index=False)
    Dataset.from_dict({"text": ["<d0> some text"]}).to_parquet(str(tmp_path / "d.parquet"))
    files = [str(tmp_path / name) for name in ("a.txt", "b.jsonl", "c.csv", "d.parquet")]
    data = config(files, shuffle_buffer_size=0, streaming_validation_texts=1, block_size=4)
    assert [text.split(">")[0] + ">" for text in share(data, tokenizer, 0, 1)] == [
        "<a1>", "<a2>", "<a3>", "<a4>", "<b0>", "<c0>", "<c1>", "<c2>", "<d0>"]


# ------------------------------------------------------------------------------------------------- packing


def test_blocks_are_the_token_stream_and_any_position_restarts_it():
    rng = random.Random(0)
    texts = [([rng.randrange(100) for _ in range(rng.randrange(1, 40))], t % 3) for t in range(60)]
    blocks = list(pack(iter(texts), 16))
    stream = list(itertools.chain.from_iterable(ids for ids, _ in texts))
    assert [ids for ids, _, _ in blocks] == [stream[i:i + 16] for i in range(0, len(stream) // 16 * 16, 16)]
    domains = list(itertools.chain.from_iterable([d] * len(ids) for ids, d in texts))
    assert [doms for _, doms, _ in blocks] == [domains[i:i + 16] for i in range(0, len(stream) // 16 * 16, 16)]
    for cut in range(len(blocks)):
        text, offset = blocks[cut][2]
        assert list(pack(iter(texts[text:]), 16, text, offset)) == blocks[cut + 1:]


# ------------------------------------------------------------------------------------------------- batches, resume


def batches(data, tokenizer, rank=0, world_size=1, batch_size=3, seed=0) -> StreamBatches:
    prepared = prepare_data(data, tokenizer, seed=seed)
    return prepared.train_batches(batch_size, rank, world_size, seed)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("taken", [0, 1, 4, 9, 23])  # about 10 batches per epoch: start, middle, later epochs
def test_resume_reads_exactly_the_batches_the_run_would_have_read(tmp_path, tokenizer, taken):
    data = config(numbered_files(tmp_path, 3, 20), shuffle_buffer_size=8)
    original = batches(data, tokenizer, rank=1, world_size=2)
    for _ in range(taken):
        next(original)
    resumed = batches(data, tokenizer, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for _ in range(12):  # crosses at least one epoch boundary
        assert same(next(resumed), next(original))
    assert resumed.state_dict() == original.state_dict()


def test_batches_are_blocks_of_the_ranks_own_texts(tmp_path, tokenizer):
    data = config(numbered_files(tmp_path, 2, 40), shuffle_buffer_size=0, block_size=32)
    ranks = [batches(data, tokenizer, rank=r, world_size=2, batch_size=2) for r in range(2)]
    for rank, stream in enumerate(ranks):
        text = tokenizer.decode(torch.cat([next(stream)["input_ids"].flatten() for _ in range(3)]))
        files = {int(name) for name in __import__("re").findall(r"<f(\d):", text)}
        assert files == {rank}  # 2 files on 2 ranks: each rank reads its own file
        assert batches(data, tokenizer).state_dict() == {"epoch": 0, "text": 0, "offset": 0}


def test_the_global_rng_is_left_alone(tmp_path, tokenizer):
    stream = batches(config(numbered_files(tmp_path, 2, 20)), tokenizer)
    state = torch.get_rng_state()
    for _ in range(25):
        next(stream)
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_at_another_world_size_continues_the_global_order(tmp_path, tokenizer):
    """3 files on 2 ranks: every rank keeps every 2nd text, so one rank resuming at the texts both had read
    continues the same global order."""
    data = config(numbered_files(tmp_path, 3, 20), shuffle_buffer_size=10)
    saved = [{"epoch": 0, "text": 7, "offset": 3}, {"epoch": 0, "text": 7, "offset": 0}]
    one = batches(data, tokenizer)
    one.resume(lambda rank: saved[rank], saved_world=2)
    assert one.state_dict() == {"epoch": 0, "text": 14, "offset": 0}
    read = [share(data, tokenizer, rank, 2)[:7] for rank in range(2)]
    assert sorted(share(data, tokenizer, 0, 1)[:14]) == sorted(read[0] + read[1])
    saved = [{"epoch": 1, "text": 2, "offset": 0}, {"epoch": 0, "text": 9, "offset": 5}]
    one.resume(lambda rank: saved[rank], saved_world=2)
    assert one.state_dict() == {"epoch": 0, "text": 9, "offset": 0}  # the lowest epoch; ranks past it count 0
    with pytest.raises(ValueError, match="without --streaming; resume it without --streaming"):
        one.resume(lambda rank: {"epoch": 0, "batches_in_epoch": 3}, saved_world=2)


# ------------------------------------------------------------------------------------------------- eval, domains


def test_held_out_texts_are_evaluated_and_never_trained_on(tmp_path, tokenizer):
    files = numbered_files(tmp_path, 2, 20)
    data = config(files, streaming_validation_texts=23)  # all of f0 and 3 texts of f1
    stream, validation, _ = open_stream(data, tokenizer)
    trained = share(data, tokenizer, 0, 1)
    assert sorted(trained) == sorted(f"<f1:{i}> " + "word " * (i % 5) for i in range(3, 20))
    assert stream.describe() == {"shards": 1, "held_out_texts": 23}
    eval_text = tokenizer.decode(list(itertools.chain.from_iterable(validation["input_ids"])))
    assert "<f0:0>" in eval_text and "<f1:2>" in eval_text and "<f1:3>" not in eval_text
    with pytest.raises(ValueError, match="holds only 40 texts, all held out for eval"):
        open_stream(config(files, streaming_validation_texts=40), tokenizer)


def test_a_validation_file_replaces_the_held_out_texts(tmp_path, tokenizer):
    files = numbered_files(tmp_path, 2, 20)
    data = config(files[1:], validation_file=files[0])
    _, validation, _ = open_stream(data, tokenizer)
    assert len(share(data, tokenizer, 0, 1)) == 20
    assert "<f0:0>" in tokenizer.decode(validation["input_ids"][0])


def test_per_file_domains_reach_every_token(tmp_path, tokenizer):
    a, b = numbered_files(tmp_path, 2, 30)
    prepared = prepare_data(config([f"code={a}", f"prose={b}"], shuffle_buffer_size=0, block_size=8), tokenizer,
                            seed=0)
    assert prepared.domains == ["code", "prose"]
    stream = prepared.train_batches(4, 0, 1, seed=0)
    seen = torch.cat([next(stream)["domain_ids"] for _ in range(40)])
    assert set(seen.flatten().tolist()) == {0, 1}
    assert set(torch.tensor(prepared.validation["domain_ids"]).flatten().tolist()) == {0}  # held out from code=


def test_a_domain_column_needs_the_listed_domains(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i} " * 4, "domain": ["web", "code"][i % 2]}) + "\n"
                            for i in range(40)))
    with pytest.raises(ValueError, match="pass them with --domains"):
        open_stream(config([str(path)]), tokenizer)
    prepared = prepare_data(config([str(path)], domains="code,web", shuffle_buffer_size=0, block_size=8), tokenizer,
                            seed=0)
    first = next(prepared.train_batches(2, 0, 1, seed=0))["domain_ids"]
    assert set(first.flatten().tolist()) <= {0, 1}


def test_a_share_without_one_block_is_refused(tmp_path, tokenizer):
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    short.write_text(json.dumps({"text": "hi"}) + "\n")
    long.write_text("".join(json.dumps({"text": "a longer text " * 5}) + "\n" for _ in range(20)))
    data = config([str(long), str(short)], streaming_validation_texts=1, shuffle_buffer_size=0, block_size=64)
    outcomes = []
    for rank in range(2):
        try:
            next(batches(data, tokenizer, rank=rank, world_size=2, batch_size=1))
            outcomes.append("ok")
        except ValueError as err:
            outcomes.append(str(err))
    assert outcomes[0] == "ok" and outcomes[1].startswith("rank 1 of 2: its share of the stream gives no block of 64")


def test_a_missing_text_column_names_the_file(tmp_path, tokenizer):
    path = tmp_path / "body.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=f"{path}: no column 'text'; its columns are \\['body'\\]"):
        open_stream(config([str(path)]), tokenizer)


def test_an_unreachable_hub_dataset_suggests_train_file(tokenizer):
    with pytest.raises(ValueError, match="To train on local text instead, pass --train_file"):
        open_stream(DataConfig(dataset_name="nobody/no_such_dataset", streaming=True), tokenizer)
