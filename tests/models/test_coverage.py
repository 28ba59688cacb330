"""Every decoder-only causal-LM family of the installed transformers: the coverage table (docs/models.md), and for
each family that converts: the converted model computes the stock dense model's logits, trains one step, saves and
resumes (an in-process DeepSpeed engine at ep_size 1; the launcher at ep_size 2 runs in tests/models/test_folders.py).

Slow-ish by nature (every family is built); the families share one survey, and each case is a model of two small
blocks. UPDATE_DOCS=1 rewrites docs/models.md's table."""

from __future__ import annotations

import gc
import os
import re
from pathlib import Path

import pytest
import torch
from family_survey import converting, models_markdown, survey
from transformers import AutoConfig, AutoModelForCausalLM, set_seed

from moe_models import MoEConfig, convert_to_moe
from moe_models.models.probe import small_config
from moe_models.moe.layer import moe_layers_of
from moe_models.moe.model_layers import balance_loss
from moe_models.run.cli import parse_args
from moe_models.training.ds_config import build_deepspeed_config
from moe_models.training.engine import build_engine

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"
BEGIN, END = "<!-- coverage table: begin -->", "<!-- coverage table: end -->"
# A refusal a user can act on names what to do: add the family, convert without the proof, start elsewhere...
ACTIONS = ("ARCHITECTURES", "--prove_conversion", "start from", "decoder-only", "not checked here")
COPIES = MoEConfig(num_experts=4, top_k=2, expert_init="copy", drop_tokens=False, top2_2nd_expert_sampling=False)


def test_at_least_20_families_convert_and_every_refusal_says_why():
    outcomes = survey()
    assert len(converting()) >= 20, [o.model_type for o in outcomes if o.converts]
    for name in ("llama", "gpt2", "phi3", "gemma", "gpt_neox", "starcoder2", "falcon", "phi", "olmo2", "granite"):
        assert name in converting(), next(o.how for o in outcomes if o.model_type == name)
    for outcome in outcomes:
        if not outcome.converts:
            assert any(action in outcome.how for action in ACTIONS), outcome


def test_docs_models_carries_the_table():
    text = DOC.read_text()
    table = f"{BEGIN}\n{models_markdown()}{END}"
    if os.environ.get("UPDATE_DOCS") == "1":
        text = re.sub(re.escape(BEGIN) + ".*" + re.escape(END), lambda _: table, text, flags=re.S)
        DOC.write_text(text)
    assert table in text, "docs/models.md's table is stale: UPDATE_DOCS=1 pytest tests/models/test_coverage.py -k docs"


def small_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    set_seed(seed)
    return AutoModelForCausalLM.from_config(small_config(AutoConfig.for_model(model_type))).eval()


def test_every_converted_family_keeps_its_function_trains_saves_and_resumes(world, tmp_path):
    cfg = parse_args(["--output_dir", str(tmp_path), "--warmup_steps", "1", "--learning_rate", "1e-3"])
    ds_config = build_deepspeed_config(cfg, world_size=1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    failures = {}
    for model_type in converting():
        try:
            check_family(model_type, ds_config, ids, tmp_path / model_type)
        except AssertionError as err:
            failures[model_type] = str(err)[:500]
    assert not failures, failures


def check_family(model_type: str, ds_config: dict, ids: torch.Tensor, folder: Path) -> None:
    dense = small_model(model_type)
    with torch.no_grad():
        expected = dense(input_ids=ids, use_cache=False).logits
        moe = convert_to_moe(dense, COPIES, seed=0)
        got = moe(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{model_type}: logits {m}")

    def engine_of(model):
        return build_engine(model.train(), ds_config, weight_decay=0.0)

    def step(engine) -> float:
        torch.manual_seed(0)  # the same dropout masks in the step after saving and the one after resuming
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss + 0.01 * balance_loss(moe_layers_of(engine.module))
        engine.backward(loss)
        engine.step()
        return loss.item()

    first = engine_of(moe)
    step(first)
    first.save_checkpoint(str(folder), tag="one")
    after_save = step(first)

    resumed = engine_of(convert_to_moe(small_model(model_type, seed=1), COPIES, seed=1))  # other weights
    resumed.load_checkpoint(str(folder), tag="one")
    try:
        assert step(resumed) == pytest.approx(after_save, rel=1e-6, abs=1e-6), f"{model_type}: resumed loss differs"
        for (name, a), b in zip(first.module.named_parameters(), resumed.module.parameters()):
            assert torch.equal(a, b), f"{model_type}: {name} differs after the same step from the checkpoint"
    finally:  # sixty engines in one process: each one's buffers go before the next family's
        for engine in (first, resumed):
            engine.destroy()
        gc.collect()
