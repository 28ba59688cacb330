"""The inference side of the payoff: each trained model exported as an HF folder and served by stock transformers
(AutoModelForCausalLM.from_pretrained, generate), the way users serve it.

Per model and batch size: prefill tokens/s (a generate call of one new token: the prompt's forward and one pick)
and decode tokens/s (a generate call of N new tokens minus that one, over the N - 1 tokens it adds), greedy, with a
fixed number of new tokens (min_new_tokens = max_new_tokens); the median of a few repeats after a warm-up. For an
MoE model every experts implementation transformers offers that runs here is timed, and the fastest is taken per
phase and recorded. Memory: the parameters' bytes and the KV cache's bytes per token (of the cache the prefill
returns). Energy per generated token from NVML's counter on NVIDIA GPUs (None elsewhere).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..metrics.device import EnergyMeter
from ..run.folder import RunFolder
from ..training.checkpoint import dense_weights

EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")  # transformers' own (integrations/moe.py)


def export_dense(run_dir: Path, output_dir: Path) -> Path:
    """A dense train.py run's last checkpoint as an HF folder (its base model config, the checkpoint's weights,
    the tokenizer): the dense model has no MoE class for moe-export to write."""
    folder = RunFolder(run_dir)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder.base_model_dir))
    model.load_state_dict(dense_weights(folder.checkpoints.latest()), strict=True)
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(folder.tokenizer_dir).save_pretrained(output_dir)
    return output_dir


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once


def cache_bytes(cache) -> int:
    """The bytes of every key and value tensor a transformers cache holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def measure(model_dir: Path, batch_sizes: tuple[int, ...] = (1, 8), prompt_tokens: int = 64, new_tokens: int = 32,
            repeats: int = 3, device: torch.device | None = None) -> dict:
    """The inference figures of the HF model in ``model_dir`` (see the module's docstring)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    implementations = _implementations(model)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    meter = EnergyMeter.for_device(device)
    result = {"device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
              "parameter_bytes": parameter_bytes(model), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "experts_implementations_tried": [i for i in implementations if i], "by_batch": {}}
    for batch in batch_sizes:
        prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator).to(device)
        timings = {}
        for impl in implementations:
            if impl:
                model.set_experts_implementation(impl)
            try:
                prefill, _ = _seconds(model, prompt, 1, repeats, device)
                full = _seconds(model, prompt, new_tokens, repeats, device, meter)
            except (RuntimeError, NotImplementedError, ValueError):  # an implementation this device cannot run
                continue
            timings[impl] = (prefill, full)
        fastest_prefill = min(timings, key=lambda i: timings[i][0])
        fastest_decode = min(timings, key=lambda i: timings[i][1][0] - timings[i][0])
        prefill_s = timings[fastest_prefill][0]
        full_s, joules = timings[fastest_decode][1]
        decode_s = max(full_s - timings[fastest_decode][0], 1e-9)
        with torch.no_grad():
            cache = model(prompt, use_cache=True).past_key_values
        result["by_batch"][str(batch)] = {
            "prefill_tokens_per_sec": batch * prompt_tokens / prefill_s,
            "decode_tokens_per_sec": batch * (new_tokens - 1) / decode_s,
            "decode_seconds_per_token": decode_s / (new_tokens - 1),
            "prefill_experts_implementation": fastest_prefill, "decode_experts_implementation": fastest_decode,
            "kv_cache_bytes_per_token": cache_bytes(cache) / (batch * prompt_tokens),
            "joules_per_generated_token": None if joules is None else joules / (batch * new_tokens),
            "seconds_by_experts_implementation": {str(i): {"prefill": p, "generate": f[0]}
                                                  for i, (p, f) in timings.items()},
        }
    return result


def _implementations(model) -> list[str | None]:
    """The experts implementations to time: transformers' own for a model with experts, [None] for one without."""
    has_experts = "experts" in {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not has_experts or not hasattr(model, "set_experts_implementation"):
        return [None]
    usable = []
    for impl in EXPERTS_IMPLEMENTATIONS:
        try:
            model.set_experts_implementation(impl)
        except (ValueError, ImportError, KeyError):
            continue
        usable.append(impl)
    return usable


def _seconds(model, prompt: torch.Tensor, new_tokens: int, repeats: int, device: torch.device,
             meter: EnergyMeter | None = None):
    """(the median seconds of a greedy generate call of exactly ``new_tokens`` tokens after one warm-up call, the
    joules per call over the timed calls: None without ``meter``)."""
    def once() -> float:
        _sync(device)
        began = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        _sync(device)
        assert out.shape[1] == prompt.shape[1] + new_tokens
        return time.perf_counter() - began

    once()
    if meter:
        meter.joules_since_last()
    seconds = statistics.median(once() for _ in range(repeats))
    return seconds, (meter.joules_since_last() / repeats if meter else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratios(figures: dict[str, dict], dense: str, quality: dict[str, float]) -> dict[str, dict]:
    """Each model's figures over the dense model's (``quality``: mean final eval loss per model), per batch size."""
    base = figures[dense]
    out = {}
    for name, f in figures.items():
        by_batch = {}
        for batch, b in f["by_batch"].items():
            d = base["by_batch"][batch]
            by_batch[batch] = {key: b[key] / d[key] for key in ("prefill_tokens_per_sec", "decode_tokens_per_sec",
                                                              "kv_cache_bytes_per_token")}
        out[name] = {"final_eval_loss": quality[name] / quality[dense],
                     "parameter_bytes": f["parameter_bytes"] / base["parameter_bytes"], "by_batch": by_batch}
    return out
