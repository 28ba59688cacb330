"""The inference measurement of the payoff on tiny stock transformers models: real generate calls, positive
figures, and memory figures equal to the tensors' bytes."""

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralConfig

from moe_models.comparison.inference import measure, ratios
from helpers import tiny_model


def stored_bytes(folder) -> int:
    """The bytes of every tensor save_pretrained wrote (tied weights once), read from the safetensors file."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(name).numel() * f.get_tensor(name).element_size() for name in f.keys())


@pytest.fixture
def generate_calls(monkeypatch):
    calls = []
    original = transformers.GenerationMixin.generate

    def counted(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        calls.append((kwargs["max_new_tokens"], output.shape))
        return output
    monkeypatch.setattr(transformers.GenerationMixin, "generate", counted)
    return calls


def test_a_dense_and_an_moe_model_are_timed_by_generate_calls_and_their_memory_is_their_tensors(tmp_path,
                                                                                               generate_calls):
    dense = tiny_model(num_hidden_layers=2)
    dense.save_pretrained(tmp_path / "dense")
    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=dense.config.vocab_size, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    moe.save_pretrained(tmp_path / "moe")

    figures = {name: measure(tmp_path / name, batch_sizes=(1, 2), prompt_tokens=8, new_tokens=3, repeats=1)
               for name in ("dense", "moe")}
    # Per batch size and implementation: a warm-up and a timed call of 1 new token, then of 3; every output is the
    # prompt plus exactly that many tokens.
    assert {(n, tuple(shape)) for n, shape in generate_calls} == {(n, (b, 8 + n)) for n in (1, 3) for b in (1, 2)}
    tried = figures["moe"]["experts_implementations_tried"]
    assert figures["dense"]["experts_implementations_tried"] == [] and tried
    assert len(generate_calls) == 2 * 2 * 2 * (1 + len(tried))
    for name, f in figures.items():
        assert f["parameter_bytes"] == stored_bytes(tmp_path / name)
        for batch in ("1", "2"):
            b = f["by_batch"][batch]
            assert b["prefill_tokens_per_sec"] > 0 and b["decode_tokens_per_sec"] > 0
            assert b["joules_per_generated_token"] is None  # no NVML on CPU
            # Keys and values of every layer: 2 x layers x kv heads x head dim x 4 bytes (fp32) per token.
            assert b["kv_cache_bytes_per_token"] == 2 * 2 * 2 * (128 // 4) * 4
    assert figures["moe"]["by_batch"]["1"]["decode_experts_implementation"] in tried

    r = ratios(figures, "dense", {"dense": 2.0, "moe": 1.8})
    assert r["moe"]["final_eval_loss"] == pytest.approx(0.9)
    assert r["moe"]["parameter_bytes"] == figures["moe"]["parameter_bytes"] / figures["dense"]["parameter_bytes"]
    assert r["moe"]["by_batch"]["2"]["decode_tokens_per_sec"] == pytest.approx(
        figures["moe"]["by_batch"]["2"]["decode_tokens_per_sec"] / figures["dense"]["by_batch"]["2"]["decode_tokens_per_sec"])
