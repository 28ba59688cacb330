"""MoETrainer, one process: plain PyTorch and DeepSpeed ZeRO-2 at ep_size 1. The router losses in the loss (against
an independent computation), expert parameter groups, end_of_step after each step, MoE metrics in the logs, exact
resume, export to a Mixtral folder that stock transformers loads. What a plain transformers.Trainer does instead is
pinned here too (docs/hf-trainer.md)."""

import dataclasses
import itertools
import os
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from datasets import Dataset, DatasetDict
from helpers import REPO, ZERO2, child_env, tiny_blocks, tiny_model, tiny_moe_model, trainer_args, trainer_losses
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, default_data_collator, set_seed

import train
from moe_models import MoETrainer, convert_to_moe, moe_layers_of
from moe_models.data.prepare import prepare_data
from moe_models.data.synthetic import synthetic_corpus, synthetic_domains
from moe_models.data.text import pack_blocks
from moe_models.hf.exporter import export
from moe_models.metrics.collapse import CollapseThresholds, console_line
from moe_models.metrics.specialisation import mutual_information_bits
from moe_models.metrics.throughput import active_parameters, attention_dims, flops_per_token
from moe_models.models.source import load_dense_model
from moe_models.models.tokenization import byte_level_tokenizer, load_tokenizer
from moe_models.moe.saved_settings import attach_settings, settings_of
from moe_models.run.folder import RECORD, RunFolder
from moe_models.training.hf_trainer import scalars
from moe_models.training.nonfinite import NonFiniteError

DEEPSPEED = {"plain": None, "zero2": ZERO2}
ZERO2_WITH_OPTIMIZER = {**ZERO2, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto",
                                                                           "torch_adam": True}}}


@pytest.fixture(autouse=True)
def fresh_accelerate_state(world):
    """Each test builds its Trainer from scratch: TrainingArguments(deepspeed=...) leaves a DeepSpeed plugin in
    accelerate's process-wide state and ACCELERATE_USE_DEEPSPEED in the environment, which would make the next plain
    Trainer a DeepSpeed one."""
    yield
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    AcceleratorState._reset_state(reset_partial_state=True)


def moe_trainer(model, output_dir, data=None, *, trainer_class=MoETrainer, **args):
    return trainer_class(model=model, args=trainer_args(output_dir, **args), train_dataset=data or tiny_blocks(),
                         data_collator=default_data_collator, processing_class=byte_level_tokenizer())


@torch.no_grad()
def reference_losses(model, input_ids: torch.Tensor) -> tuple[float, list[float], list[float]]:
    """The LM loss (transformers' own), and per MoE layer the top-2 balance loss and the z-loss computed here from the
    layer's input and router weight alone: E x sum_e mean_t(p_te) x share of tokens whose first choice is e
    (DeepSpeed's top-2 l_aux), and mean_t logsumexp(logits_t)^2."""
    layers, inputs = moe_layers_of(model), {}
    hooks = [layer.register_forward_pre_hook(lambda module, args: inputs.update({module: args[0]})) for layer in layers]
    lm_loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    for hook in hooks:
        hook.remove()
    balance, z = [], []
    for layer in layers:
        x_TD = inputs[layer].reshape(-1, inputs[layer].shape[-1]).float()
        logits_TE = x_TD @ layer.router.wg.weight.float().T
        probs_TE = logits_TE.softmax(dim=-1)
        first_TE = torch.nn.functional.one_hot(probs_TE.argmax(dim=-1), probs_TE.shape[1]).float()
        balance.append((probs_TE.shape[1] * (probs_TE.mean(0) * first_TE.mean(0)).sum()).item())
        z.append(torch.logsumexp(logits_TE, dim=-1).square().mean().item())
    return lm_loss, balance, z


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("backend", sorted(DEEPSPEED))
def test_the_loss_is_the_lm_loss_plus_the_router_losses(backend, accumulation, tmp_path):
    """Step 1's logged loss against an independent lm + 0.1 x balance + 0.01 x z-loss of the same weights and batch.
    Every micro-batch is the same block, so each one's router loss is the step's; with accumulation the router loss
    must be averaged over micro-batches (not summed), as the LM loss is."""
    moe = dict(aux_loss_coef=0.1, router_z_loss_coef=0.01)
    block = tiny_blocks()[0]["input_ids"]
    data = Dataset.from_dict({"input_ids": [block] * 8, "labels": [block] * 8})
    lm_loss, balance, z = reference_losses(tiny_moe_model(**moe), torch.tensor([block] * 4))

    trainer = moe_trainer(tiny_moe_model(**moe), tmp_path, data, max_steps=1,
                          per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation,
                          deepspeed=DEEPSPEED[backend])
    trainer.train()
    row = next(r for r in trainer.state.log_history if "loss" in r)
    assert row["loss"] == pytest.approx(lm_loss + 0.1 * sum(balance) + 0.01 * sum(z), rel=1e-5)
    assert row["loss"] - lm_loss > 0.1  # the router losses are in it
    assert row["aux_loss"] == pytest.approx(sum(balance), rel=1e-5)
    for i in range(4):
        assert row[f"moe/layer_{i}/aux_loss"] == pytest.approx(balance[i], rel=1e-5)
        assert row[f"moe/layer_{i}/z_loss"] == pytest.approx(z[i], rel=1e-5)
        assert row[f"moe/layer_{i}/routed_tokens"] == 8 * len(block)
        assert sum(row[f"moe/layer_{i}/tokens_per_expert/{e}"] for e in range(4)) == 2 * 8 * len(block)


def test_gradient_checkpointing_changes_no_loss_and_counts_each_forward_once(tmp_path):
    """transformers' activation checkpointing runs each block's forward again in the backward: the router losses are
    taken from the first forward, and the recomputation is not counted in the routing metrics."""
    rows = []
    for checkpointing in (False, True):
        trainer = moe_trainer(tiny_moe_model(aux_loss_coef=0.1, router_z_loss_coef=0.01), tmp_path / str(checkpointing),
                              max_steps=2, gradient_checkpointing=checkpointing)
        trainer.train()
        rows.append([r for r in trainer.state.log_history if "loss" in r])
    for plain, checkpointed in zip(*rows):
        assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert checkpointed["moe/layer_0/routed_tokens"] == plain["moe/layer_0/routed_tokens"] == 4 * 32


def test_a_plain_trainer_adds_no_router_loss(tmp_path):
    block = tiny_blocks()[0]["input_ids"]
    data = Dataset.from_dict({"input_ids": [block] * 4, "labels": [block] * 4})
    lm_loss, _, _ = reference_losses(tiny_moe_model(aux_loss_coef=0.1), torch.tensor([block] * 4))
    trainer = moe_trainer(tiny_moe_model(aux_loss_coef=0.1), tmp_path, data, trainer_class=Trainer, max_steps=1)
    trainer.train()
    assert trainer_losses(trainer.state.log_history)[1] == pytest.approx(lm_loss, rel=1e-5)


@pytest.mark.parametrize("backend", sorted(DEEPSPEED))
def test_the_aux_loss_free_bias_moves_after_every_step(backend, tmp_path):
    """bias += rate x sign(mean load - load) after each step, the load being the step's routes per expert (logged as
    routed_per_expert, every step); a plain Trainer never moves it."""
    rate = 0.05
    trainer = moe_trainer(tiny_moe_model(router_bias_update_rate=rate), tmp_path, max_steps=2,
                          deepspeed=DEEPSPEED[backend])
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    for i in range(4):
        expected = torch.zeros(4, dtype=torch.float64)
        for row in rows:
            load = torch.tensor([row[f"moe/layer_{i}/routed_per_expert/{e}"] for e in range(4)], dtype=torch.float64)
            moves = rate * torch.sign(load.mean() - load)
            assert moves.abs().sum() > 0  # an uneven load
            expected += moves
            logged = torch.tensor([row[f"moe/layer_{i}/score_bias/{e}"] for e in range(4)], dtype=torch.float64)
            torch.testing.assert_close(logged, expected)
        torch.testing.assert_close(trainer.moe_layers[i].router.score_bias.double(), expected)

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    plain = moe_trainer(tiny_moe_model(router_bias_update_rate=rate), tmp_path / "plain", trainer_class=Trainer,
                        max_steps=2)
    plain.train()
    assert all(layer.router.score_bias.abs().sum() == 0 for layer in moe_layers_of(plain.model))


def optimizer_groups(trainer) -> list[dict]:
    """The param groups of the optimizer DeepSpeed steps (inside ZeRO's wrapper)."""
    return trainer.model_wrapped.optimizer.optimizer.param_groups


@pytest.mark.parametrize("ds_config", [ZERO2, ZERO2_WITH_OPTIMIZER], ids=["trainer_optimizer", "deepspeed_optimizer"])
def test_deepspeed_gets_expert_parameter_groups_and_no_decay_on_norms(ds_config, tmp_path):
    trainer = moe_trainer(tiny_moe_model(), tmp_path, max_steps=1, deepspeed=ds_config, weight_decay=0.1)
    trainer.train()
    groups = optimizer_groups(trainer)
    assert {(g.get("moe", False), g["weight_decay"]) for g in groups} == {(False, 0.1), (False, 0.0), (True, 0.1)}
    # every expert parameter is in an expert group: ZeRO flattens each group into one tensor of its parameters
    expert_numel = sum(p.numel() for layer in trainer.moe_layers for p in layer.experts.parameters())
    assert sum(g["params"][0].numel() for g in groups if g.get("moe")) == expert_numel


def test_a_plain_trainer_fails_deepspeed_moe_checks_or_decays_every_parameter(tmp_path):
    """The finding: without an "optimizer" section (the Trainer's AdamW, decay / no-decay groups) ZeRO refuses the
    model; with one, DeepSpeed makes the expert groups itself but puts every parameter under weight decay."""
    with pytest.raises(AssertionError, match="None of the param groups are marked as MoE"):
        moe_trainer(tiny_moe_model(), tmp_path, trainer_class=Trainer, max_steps=1, deepspeed=ZERO2).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = moe_trainer(tiny_moe_model(), tmp_path, trainer_class=Trainer, max_steps=1,
                          deepspeed=ZERO2_WITH_OPTIMIZER, weight_decay=0.1)
    trainer.train()
    assert {(g.get("moe", False), g["weight_decay"]) for g in optimizer_groups(trainer)} == {(False, 0.1), (True, 0.1)}


@pytest.mark.parametrize("backend", sorted(DEEPSPEED))
def test_resume_gives_the_same_losses_and_biases(backend, tmp_path):
    """4 steps in one go against 2 + 2 from checkpoint-2 into a model built with another seed: weights, optimizer,
    schedule, aux-loss-free biases and data position all come back."""
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, deepspeed=DEEPSPEED[backend],
                    lr_scheduler_type="cosine", warmup_steps=1)
    straight = moe_trainer(tiny_moe_model(router_bias_update_rate=0.02), tmp_path / "straight", **settings)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / RECORD).is_file()
    if backend == "zero2":
        files = {p.name for p in (checkpoint / "global_step2").glob("layer_*_expert_*_model_states.pt")}
        assert files == {f"layer_{i}_expert_{e}_mp_rank_00_model_states.pt" for i in range(4) for e in range(4)}

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = moe_trainer(tiny_moe_model(seed=1, router_bias_update_rate=0.02), tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    want, got = trainer_losses(straight.state.log_history), trainer_losses(resumed.state.log_history)
    assert sorted(got) == [1, 2, 3, 4]  # steps 1 and 2 from the checkpoint's trainer_state.json
    assert [got[step] for step in range(1, 5)] == pytest.approx([want[step] for step in range(1, 5)], rel=1e-6)
    for a, b in zip(straight.moe_layers, resumed.moe_layers):
        torch.testing.assert_close(b.router.score_bias, a.router.score_bias, rtol=0, atol=0)


@pytest.mark.parametrize("backend", sorted(DEEPSPEED))
def test_export_loads_natively_with_the_trained_logits(backend, tmp_path):
    trainer = moe_trainer(tiny_moe_model(), tmp_path / "run", max_steps=3, save_strategy="steps", save_steps=3,
                          deepspeed=DEEPSPEED[backend])
    trainer.train()
    export(tmp_path / "run", tmp_path / "hf")  # the output_dir: its newest checkpoint-N
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trainer.model.eval()(ids).logits, rtol=1e-4, atol=1e-4)
        untrained = tiny_moe_model().eval()(ids).logits
    assert not torch.allclose(hf(ids).logits, untrained, atol=1e-3)  # the trained weights, not the initial ones


def test_save_model_folder_exports_too(tmp_path):
    trainer = moe_trainer(tiny_moe_model(), tmp_path / "run", max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    export(tmp_path / "final", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 257, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trainer.model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_refusals_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="convert it first"):
        moe_trainer(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match=r"ep_size 2: expert parallelism needs DeepSpeed.*TrainingArguments\(deep"):
        moe_trainer(recorded_as(tiny_moe_model(), ep_size=2), tmp_path)
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        moe_trainer(tiny_moe_model(), tmp_path, deepspeed={**ZERO2, "zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="model_init is not supported"):
        MoETrainer(model_init=tiny_moe_model, args=trainer_args(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="or a folder MoETrainer saved"):
        export(tmp_path / "empty", tmp_path / "hf")
    model, no_tokenizer = tiny_moe_model(), tmp_path / "no_tokenizer"
    model.config.save_pretrained(no_tokenizer)
    RunFolder(no_tokenizer).write_moe_settings(*settings_of(model))
    with pytest.raises(ValueError, match="tokenizer_config.json: .* pass processing_class=tokenizer to MoETrainer"):
        export(no_tokenizer, tmp_path / "hf")


def recorded_as(model, **moe):
    """``model`` with its recorded MoE settings changed (real ep_size 2 layers need 2 ranks to build)."""
    settings, layout = settings_of(model)
    attach_settings(model, dataclasses.replace(settings, **moe), layout)
    return model


@pytest.mark.slow
def test_the_example_runs_and_the_docs_show_it_verbatim(tmp_path):
    example = (REPO / "examples" / "hf_trainer.py").read_text()
    assert f"```python\n{example}```" in (REPO / "docs" / "hf-trainer.md").read_text()
    out = tmp_path / "out"
    for command in (["examples/hf_trainer.py", "--deepspeed", "--max_steps", "2", "--output_dir", str(out)],
                    ["-m", "moe_models.export", "--checkpoint", str(out), "--output", str(out / "hf")]):
        result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300,
                                env=child_env(PYTHONPATH=str(REPO)))
        assert result.returncode == 0, result.stderr[-4000:]
    assert "Wrote MixtralForCausalLM" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(out / "hf").config.num_local_experts == 8


# -- one MoE step for both trainers (moe/model_layers.py) ------------------------------------------------------------------

# Conversations, packed: the loss on the answers, and the padding at the end of each block not routed.
PARITY_FLAGS = ["--num_experts", "4", "--top_k", "2", "--score_function", "sigmoid",
                "--router_bias_update_rate", "0.01", "--router_z_loss_coef", "0.01",
                "--train_file", str(REPO / "examples" / "chat" / "conversations.jsonl"),
                "--chat_template", str(REPO / "examples" / "chat" / "chat.jinja"), "--block_size", "128",
                "--per_device_train_batch_size", "2", "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "0",
                "--max_eval_batches", "1", "--warmup_steps", "2", "--deepspeed", "zero2", "--disable_tqdm",
                "--peak_tflops", "0.002"]
# Each trainer's own values beside the row the bookkeeping (training/bookkeeping.py) gives both.
OWN_KEYS = {"train.py": {"step", "loss", "lr", "grad_norm", "tokens_seen", "skipped_steps"},
            "MoETrainer": {"step", "loss", "grad_norm", "learning_rate", "epoch"}}


class InOrder(MoETrainer):
    """The batches in the order of the dataset (the Trainer otherwise shuffles them)."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def moe_keys(row: dict) -> dict:
    """A row's MoE metrics as the Trainer's loggers take them (per-expert lists as one scalar per expert)."""
    return {key: value for key, value in scalars(row, per_expert=True).items()
            if key.startswith("moe/") or key == "aux_loss"}


def test_train_py_and_moe_trainer_log_the_same_moe_metrics(world, tmp_path):
    """The same model (built as train.py builds it), the same batches in the same order (packed conversations: their
    labels, position ids and padding), the same DeepSpeed optimizer and schedule (train.py's resolved JSON): both
    trainers train on the same answer tokens, route the same real tokens (not the padding) and log the same MoE keys
    with the same values at every step,
    with the scored rule, the z-loss and the aux-loss-free bias on (the biases move the routing of later steps); the
    same row keys beside each trainer's own, and MFU from the same FLOPs per token (PaLM's 6 N + 12 L d T of the
    sequence length, the figure train.py records) and peak."""
    out = tmp_path / "train_py"
    train.main([*PARITY_FLAGS, "--output_dir", str(out)])
    ours = [row for row in RunFolder(out).metrics.rows() if "loss" in row]
    record = RunFolder(out).record()
    cfg = record.settings

    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = convert_to_moe(load_dense_model(cfg.model, vocab_needed=len(tokenizer)), cfg.moe, seed=cfg.train.seed)
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    batches = data.train_batches(cfg.train.per_device_train_batch_size, 0, 1, seed=cfg.train.seed)
    steps = [next(batches) for _ in range(cfg.train.max_steps)]
    assert set(steps[0]) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert all((batch["position_ids"][:, 1:] == 0).any(dim=1).all() for batch in steps)  # 2+ sequences in each block
    blocks = Dataset.from_dict({name: torch.cat([batch[name] for batch in steps]).tolist() for name in steps[0]})
    t = cfg.train
    args = trainer_args(tmp_path / "hf", deepspeed=record.resolved.deepspeed_config, max_steps=t.max_steps,
                        per_device_train_batch_size=t.per_device_train_batch_size, learning_rate=t.learning_rate,
                        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, adam_beta1=0.9, adam_beta2=0.95,
                        adam_epsilon=1e-8, warmup_steps=t.warmup_steps)
    trainer = InOrder(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator,
                      peak_tflops=0.002)
    trainer.train()
    theirs = [row for row in trainer.state.log_history if "loss" in row]
    assert all(layer.real_tokens is None for layer in trainer.moe_layers)  # the last batch's padding forgotten

    assert [row["step"] for row in theirs] == [row["step"] for row in ours] == [1, 2, 3, 4]
    real_tokens = [int(batch["attention_mask"].sum()) for batch in steps]
    assert all(real < cfg.train.per_device_train_batch_size * 128 for real in real_tokens)  # each step has padding
    for mine, hf, real, batch in zip(ours, theirs, real_tokens, steps):
        assert mine["moe/layer_0/routed_tokens"] == hf["moe/layer_0/routed_tokens"] == real
        assert mine["trained_tokens"] == hf["trained_tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    for mine, hf in zip(ours, theirs):
        expected, logged = moe_keys(mine), moe_keys(hf)
        assert logged.keys() == expected.keys() and len(expected) > 4 * 12
        assert logged == pytest.approx(expected, rel=1e-4, abs=1e-6), f"step {mine['step']}"
    assert any(value != 0 for key, value in moe_keys(ours[-1]).items() if "score_bias" in key)  # the biases moved
    for mine, hf in zip(ours, theirs):
        assert set(scalars(mine, per_expert=True)) - OWN_KEYS["train.py"] == set(hf) - OWN_KEYS["MoETrainer"]
    flops = record.resolved.flops_per_token
    assert trainer.book.flops_per_token == flops and flops == 6 * active_parameters(
        trainer.model, trainer.moe_layers) + 12 * 4 * trainer.model.config.hidden_size * 128  # 4 blocks, 128 tokens
    for row in (*ours, *theirs):
        assert row["mfu"] == pytest.approx(row["tokens_per_sec"] * flops / 0.002e12, rel=1e-9)


def test_moe_trainer_warns_of_collapse_counts_domains_and_reports_mfu(tmp_path, capsys):
    """What train.py's loop gives beside the routing metrics: collapse warnings (here a threshold every router
    crosses), routes per (domain, expert) at eval from the data's domain_ids, MFU against the given peak."""
    texts = DatasetDict({"train": synthetic_corpus(200, seed=0)})
    domains = list(synthetic_domains(None))
    blocks = pack_blocks(texts, byte_level_tokenizer(), 32, "text", domains=domains)["train"]
    blocks = blocks.map(lambda batch: {"labels": batch["input_ids"]}, batched=True)
    trainer = MoETrainer(model=tiny_moe_model(), args=trainer_args(tmp_path, max_steps=3), train_dataset=blocks,
                         eval_dataset=blocks.select(range(8)), data_collator=default_data_collator,
                         collapse=CollapseThresholds(imbalance=1.01, dead_expert_share=0, min_tokens=0), peak_tflops=1.0,
                         domains=domains)
    trainer.train()
    warnings = [w for w in trainer.collapse_warnings if w["collapse"] == "warning"]
    assert warnings and {w["condition"] for w in warnings} == {"imbalance"} and warnings[0]["step"] == 2
    out = capsys.readouterr().out
    assert console_line(warnings[0]) in out and warnings[0]["message"] not in out  # the advice: in the row
    row = next(r for r in trainer.state.log_history if r.get("step") == 3 and "loss" in r)
    # the console prints each log's summaries; the per-layer and per-expert values go to the reporters only
    printed = [line for line in out.splitlines() if "'loss'" in line]
    assert len(printed) == 3 and not any("moe/layer_" in line for line in printed), out[-2000:]
    assert "moe/layer_0/tokens_per_expert/0" in row and "'tokens_per_sec'" in printed[-1]
    flops = flops_per_token(active_parameters(trainer.model, trainer.moe_layers), *attention_dims(trainer.model.config),
                            32)
    assert row["mfu"] == pytest.approx(row["tokens_per_sec"] * flops / 1e12, rel=1e-6) and row["nonfinite_steps"] == 0

    metrics = trainer.evaluate()
    for i in range(4):
        counts = metrics[f"eval_moe/layer_{i}/domain_expert_counts"]  # logged one scalar per cell: .../{d}/{e}
        assert len(counts) == len(domains) and len(counts[0]) == 4
        tokens = sum(sum(1 for d in row if d >= 0) for row in blocks.select(range(8))["domain_ids"])
        assert sum(map(sum, counts)) == 2 * tokens  # top-2 routes of every token with a domain
        assert metrics[f"eval_moe/layer_{i}/domain_mutual_information"] == pytest.approx(
            mutual_information_bits(counts))


@pytest.mark.parametrize("backend", ["plain", "zero0", "zero2"])  # the guard drops, the guard's optimizer, DeepSpeed
def test_moe_trainer_skips_nonfinite_steps_and_stops_after_too_many(backend, tmp_path, monkeypatch):
    """A step with a NaN loss changes no weight and is counted (also across a resume's log); max_nonfinite_steps in a
    row end training with train.py's message."""
    deepspeed = {"plain": None, "zero0": {**ZERO2, "zero_optimization": {"stage": 0}}, "zero2": ZERO2}[backend]
    real, calls = MoETrainer.compute_loss, itertools.count(1)

    def poisoned_at(steps):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = real(self, model, inputs, *args, **kwargs)
            return loss * float("nan") if self.model.training and next(calls) in steps else loss
        return compute_loss

    monkeypatch.setattr(MoETrainer, "compute_loss", poisoned_at({2}))
    saves = dict(save_strategy="steps", save_steps=2) if backend == "plain" else {}
    trainer = moe_trainer(tiny_moe_model(), tmp_path / "one", max_steps=3, deepspeed=DEEPSPEED.get(backend, deepspeed),
                          **saves)
    weights = {}
    trainer.add_callback(SnapshotWeights(weights))
    trainer.train()
    assert [r["nonfinite_steps"] for r in trainer.state.log_history if "loss" in r] == [0, 1, 1]
    assert all(torch.equal(weights[1][name], weights[2][name]) for name in weights[1])  # step 2 changed nothing
    assert not all(torch.equal(weights[2][name], weights[3][name]) for name in weights[2])  # step 3 trained
    if saves:  # the count is part of the run: a resume from checkpoint-2 continues it
        resumed = moe_trainer(tiny_moe_model(), tmp_path / "resumed", max_steps=3)
        resumed.train(resume_from_checkpoint=str(tmp_path / "one" / "checkpoint-2"))
        assert [r["nonfinite_steps"] for r in resumed.state.log_history if "loss" in r] == [0, 1, 1]

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    calls = itertools.count(1)
    monkeypatch.setattr(MoETrainer, "compute_loss", poisoned_at(set(range(2, 100))))
    stopping = MoETrainer(model=tiny_moe_model(), args=trainer_args(tmp_path / "two", max_steps=20,
                                                                    deepspeed=DEEPSPEED.get(backend, deepspeed)),
                          train_dataset=tiny_blocks(), data_collator=default_data_collator, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match=r"steps 2\.\.4: 3 optimizer steps in a row had a non-finite loss .*"
                                             r"max_nonfinite_steps=3.* a lower learning_rate \(now 0\.003\)"):
        stopping.train()
    assert stopping.state.global_step == 4


class SnapshotWeights(TrainerCallback):
    """Every parameter after each optimizer step, by step."""

    def __init__(self, into: dict):
        self.into = into

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.into[state.global_step] = {name: p.detach().clone() for name, p in model.named_parameters()}
