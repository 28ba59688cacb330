"""Both trainers keep one bookkeeping (training/bookkeeping.py): train.py's loop and MoETrainer, one step each of the
same model on the same batch, give the same row keys, the same FLOPs per token (PaLM's formula, written out here) and
MFU from the same inputs, and the same balance loss and routing counts of that batch."""

import pytest
from helpers import tiny_blocks, tiny_moe_model, trainer_args
from transformers import default_data_collator

from moe_models import MoETrainer
from moe_models.data.batches import TrainBatches
from moe_models.run.cli import parse_args
from moe_models.run.folder import RunFolder
from moe_models.training import bookkeeping
from moe_models.training.ds_config import build_deepspeed_config
from moe_models.training.engine import build_engine
from moe_models.training.loop import TrainLoop

BATCH, SEQUENCE, PEAK = 4, 32, 0.002  # one batch of 4 blocks of 32 tokens; a peak in TFLOPS so that MFU is reported
OWN_KEYS = {"train.py": {"step", "loss", "lr", "grad_norm", "tokens_seen", "skipped_steps"},
            "MoETrainer": {"step", "loss", "grad_norm", "learning_rate", "epoch"}}  # each trainer's own, beside the row


@pytest.fixture(scope="module")
def rows(world, tmp_path_factory):
    """{trainer: (the bookkeeping's row of step 1, its Bookkeeping)}, each trainer on the same 4 blocks."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return both_trainers(tmp_path_factory.mktemp("bookkeeping"), world, monkeypatch)


def both_trainers(tmp_path, world, monkeypatch) -> dict:
    kept = {}
    real = bookkeeping.Bookkeeping.training_row

    def keep(book, *args, **kwargs):
        row, summed = real(book, *args, **kwargs)
        kept.setdefault(id(book), (row, book))
        return row, summed

    monkeypatch.setattr(bookkeeping.Bookkeeping, "training_row", keep)
    blocks = tiny_blocks(block_size=SEQUENCE).select(range(BATCH))

    cfg = parse_args(["--num_experts", "4", "--top_k", "2", "--drop_tokens", "false", "--expert_init", "random",
                      "--max_steps", "1", "--eval_steps", "0", "--peak_tflops", str(PEAK), "--disable_tqdm",
                      "--block_size", str(SEQUENCE), "--per_device_train_batch_size", str(BATCH), "--deepspeed",
                      "zero0", "--output_dir", str(tmp_path / "loop")])
    (tmp_path / "loop").mkdir()
    engine = build_engine(tiny_moe_model(), build_deepspeed_config(cfg, world_size=1), cfg.train.weight_decay)
    loop = TrainLoop(cfg, engine, world, TrainBatches(blocks.select_columns(["input_ids"]), BATCH, 0, 1, seed=0),
                     blocks.select_columns(["input_ids"]), RunFolder(tmp_path / "loop"))
    loop.train_step()
    loop.state.step = 1
    loop.log_training_row(loop.zero())
    loop.sinks.close()

    trainer = MoETrainer(model=tiny_moe_model(), args=trainer_args(tmp_path / "hf", max_steps=1), train_dataset=blocks,
                         data_collator=default_data_collator, peak_tflops=PEAK)
    trainer.train()
    (loop_row, loop_book), (hf_row, hf_book) = kept[id(loop.book)], kept[id(trainer.book)]
    return {"train.py": (loop_row, loop_book), "MoETrainer": (hf_row, hf_book), "logged": trainer.state.log_history}


def test_both_trainers_give_the_same_row_from_the_same_batch(rows):
    (loop_row, loop_book), (hf_row, hf_book) = rows["train.py"], rows["MoETrainer"]
    assert set(loop_row) == set(hf_row)
    assert {"aux_loss", "tokens_per_sec", "step_time", "mfu", "nonfinite_steps", "moe/layer_0/routed_per_expert",
            "cpu_rss_gib"} <= set(loop_row)
    # the same batch through the same weights: the same balance loss and the same routes per expert
    assert loop_row["aux_loss"] == pytest.approx(hf_row["aux_loss"], rel=1e-6)
    for i in range(4):
        assert loop_row[f"moe/layer_{i}/routed_per_expert"] == hf_row[f"moe/layer_{i}/routed_per_expert"]
    # MFU's inputs: FLOPs per token (6 N + 12 L d T, written out here), the peak, the tokens of the step
    model, config = hf_book.model, hf_book.model.config
    lookup = model.get_input_embeddings().weight
    embeddings = 0 if model.get_output_embeddings().weight is lookup else lookup.numel()  # a tied one multiplies
    experts = sum(p.numel() for layer in hf_book.moe_layers for p in layer.experts.parameters())
    active = sum(p.numel() for p in model.parameters()) - embeddings - experts // 2  # top-2 of 4 experts
    expected = 6 * active + 12 * config.num_hidden_layers * config.hidden_size * SEQUENCE
    assert loop_book.flops_per_token == hf_book.flops_per_token == expected
    assert loop_book.peak_tflops == hf_book.peak_tflops == PEAK
    for row in (loop_row, hf_row):
        assert row["mfu"] == pytest.approx(row["tokens_per_sec"] * expected / (PEAK * 1e12), rel=1e-9)
        assert row["tokens_per_sec"] * row["step_time"] == pytest.approx(BATCH * SEQUENCE, rel=1e-9)


def test_the_trainers_own_keys_are_all_that_differ(rows):
    """What MoETrainer logs is the bookkeeping's row (per-expert lists as one scalar each, ``key/{e}``) plus the
    Trainer's own values."""
    (loop_row, _), logged = rows["train.py"], rows["logged"]
    hf_logged = next(row for row in logged if "aux_loss" in row)
    scalar_keys = {key for key, value in loop_row.items() if not isinstance(value, list)}
    per_expert = {key for key in hf_logged if key.rsplit("/", 1)[-1].isdigit()}
    assert scalar_keys <= set(hf_logged)
    assert set(hf_logged) - scalar_keys - per_expert <= OWN_KEYS["MoETrainer"]
