"""Training metrics end to end (rows, console, report PNGs) and the MFU arithmetic."""

import json
import math
from pathlib import Path

import matplotlib.image
import pynvml
import pytest
import torch
from helpers import tiny_model

from moe_models.data.batches import TrainBatches
from moe_models.data.text import load_text_datasets, pack_blocks
from moe_models.metrics.device import DeviceInterval, EnergyMeter
from moe_models.metrics.sinks import Progress, bars, expert_load_lines
from moe_models.metrics.throughput import (active_parameters, attention_dims, flops_per_token, known_peak_tflops,
                                           resolve_peak_tflops, throughput_metrics)
from moe_models.models.tokenization import byte_level_tokenizer
from moe_models.moe.layer import moe_layers_of
from moe_models.moe.surgery import convert_to_moe
from moe_models.report import main as report_main
from moe_models.run.cli import parse_args
from moe_models.run.config import MoEConfig
from moe_models.training.ds_config import build_deepspeed_config
from moe_models.training.engine import build_engine
from moe_models.run.folder import RunFolder
from moe_models.training.loop import TrainLoop

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK = ["--num_experts", "4", "--top_k", "2", "--drop_tokens", "true", "--capacity_factor", "0.5", "--max_steps", "5", "--logging_steps", "2",
         "--eval_steps", "4", "--max_eval_batches", "2", "--warmup_steps", "1", "--synthetic_examples", "600",
         "--block_size", "32", "--per_device_train_batch_size", "4", "--disable_tqdm"]


def train_quick(world, output_dir: Path, *flags: str) -> tuple[TrainLoop, list[dict]]:
    cfg = parse_args([*QUICK, "--output_dir", str(output_dir), *flags])
    model = convert_to_moe(tiny_model().train(), cfg.moe, seed=0)
    data = pack_blocks(load_text_datasets(cfg.data, seed=0), byte_level_tokenizer(), cfg.data.block_size, "text")
    engine = build_engine(model, build_deepspeed_config(cfg, world_size=1), cfg.train.weight_decay)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = TrainLoop(cfg, engine, world, TrainBatches(data["train"], 4, 0, 1, seed=0), data["validation"],
                        RunFolder(output_dir))
    trainer.train()
    return trainer, [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quick_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics") / "run"
    return out, *train_quick(world, out, "--peak_tflops", "0.002")


def test_training_rows_hold_every_metric_and_the_counts_add_up(quick_run):
    _, trainer, rows = quick_run
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 5]
    steps_in_interval = [1, 1, 2, 1]
    for row, steps in zip(train_rows, steps_in_interval):
        assert {"loss", "aux_loss", "lr", "grad_norm", "tokens_per_sec", "tokens_per_sec_per_device", "step_time",
                "mfu", "tokens_seen", "skipped_steps", "cpu_rss_gib"} <= set(row)
        assert "energy_j" not in row and "gpu_max_allocated_gib" not in row  # CPU: absent, never estimated
        assert row["mfu"] == pytest.approx(row["tokens_per_sec"] * trainer.book.flops_per_token / 0.002e12)
        tokens = steps * 4 * 32
        assert row["tokens_per_sec"] * row["step_time"] * steps == pytest.approx(tokens)
        layer_aux = []
        for i in range(4):
            layer = {k.split("/")[-1]: v for k, v in row.items() if k.startswith(f"moe/layer_{i}/")}
            assert layer["routed_tokens"] == tokens
            assert sum(layer["tokens_per_expert"]) == layer["routed_tokens"] * 2 - layer["dropped"]
            assert sum(layer["routed_per_expert"]) == layer["routed_tokens"] * 2
            assert layer["dropped"] > 0  # capacity_factor 0.5 drops about half of the routes
            assert 0 < layer["router_entropy"] <= math.log(4) + 1e-6
            assert layer["imbalance"] >= 1.0
            layer_aux.append(layer["aux_loss"])
        assert sum(layer_aux) == pytest.approx(row["aux_loss"], rel=1e-5)


def test_eval_rows_hold_expert_similarity_and_checkpoints_a_wandb_slot(quick_run):
    out, _, rows = quick_run
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [4, 5]
    for i in range(4):
        assert 0.9 < eval_rows[-1][f"moe/layer_{i}/expert_similarity"] <= 1.0  # copies that began to diverge
    client = torch.load(out / "checkpoints" / "global_step5" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["wandb_run_id"] is None  # no --report_to wandb


def test_console_shows_one_expert_load_line_per_layer_at_eval(quick_run, capsys):
    _, _, rows = quick_run
    last_train, last_eval = [r for r in rows if "loss" in r][-1], [r for r in rows if "eval_loss" in r][-1]
    lines = expert_load_lines(last_train)
    assert len(lines) == 4 and lines[0].startswith("  moe layer 0: load ")
    assert "imbalance" in lines[0] and "dropped" in lines[0] and f"/{math.log(4):.2f} nats" in lines[0]
    assert bars([0, 1, 2, 4]) == "▁▃▅█"
    console = Progress(total=5, enabled=True)
    console.start(step=4)
    console.log(last_train)
    console.log(last_eval)
    console.close()
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert f"step 5: eval_loss {last_eval['eval_loss']:.4f}" in printed
    assert all(line in printed for line in lines)


def test_report_writes_valid_pngs_and_a_summary(quick_run, tmp_path, capsys):
    out, _, _ = quick_run
    report_main([str(out), "--report_dir", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["expert_load_layer_0.png", "expert_load_layer_1.png", "expert_load_layer_2.png",
                     "expert_load_layer_3.png", "loss.png", "routing.png", "summary.txt", "throughput.png"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    summary = (tmp_path / "summary.txt").read_text()
    assert "loss " in summary and "moe layer 3: imbalance" in summary and "mfu median" in summary
    assert summary in capsys.readouterr().out


def test_report_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl not found: give the --output_dir of a train.py run"):
        report_main([str(tmp_path)])


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
                                        ("NVIDIA A10", 125.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", None),
                                        ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None)])
def test_peak_table(name, peak):
    assert known_peak_tflops(name) == peak


def test_mfu_is_omitted_without_a_peak():
    assert resolve_peak_tflops(None, torch.device("cpu"), bf16=False)[0] is None
    assert resolve_peak_tflops(7.5, torch.device("cpu"), bf16=False) == (7.5, "--peak_tflops")
    assert "mfu" not in throughput_metrics(1000, 2, 1.0, 2, 1e9, peak_tflops=None)
    row = throughput_metrics(tokens=4000, steps=2, seconds=2.0, world_size=2, flops_per_token=1e9, peak_tflops=1.0)
    assert row == {"tokens_per_sec": 2000, "tokens_per_sec_per_device": 1000, "step_time": 1.0,
                   "mfu": pytest.approx(1000 * 1e9 / 1e12)}


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_active_parameters_count_top_k_experts(overrides, top_k):
    """An upcycled MoE with top_k experts active does the dense model's work with k FFNs plus the routers."""
    dense = tiny_model(**overrides)
    dense_params = sum(p.numel() for p in dense.parameters())
    lookups = 0 if dense.config.tie_word_embeddings else dense.get_input_embeddings().weight.numel()
    ffn = sum(p.numel() for p in dense.model.layers[0].mlp.parameters())
    moe = convert_to_moe(dense, MoEConfig(num_experts=4, top_k=top_k))
    router = 4 * dense.config.hidden_size
    expected = dense_params - lookups + 4 * ((top_k - 1) * ffn + router)
    assert active_parameters(moe, moe_layers_of(moe)) == expected


def test_flops_per_token_follows_the_palm_formula():
    model = tiny_model("tiny-qwen3")  # head_dim (32) x heads (4) = 128
    assert attention_dims(model.config) == (4, 128)
    assert flops_per_token(1_000_000, 4, 128, 256) == 6 * 1_000_000 + 12 * 4 * 128 * 256
    assert attention_dims(tiny_model("tiny-gpt2").config) == (4, 128)


def test_energy_comes_from_the_nvml_counter_of_every_rank(monkeypatch):
    readings = iter([10_000, 12_500, 20_000])  # millijoules since the driver loaded
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", lambda handle: next(readings))
    stats = DeviceInterval(device=torch.device("cpu"))
    assert stats.energy is None  # no NVIDIA GPU: no energy keys at all
    stats.energy = EnergyMeter(handle=None)
    assert [value.item() for value in stats.sums().values()] == [2.5, 1.0]  # joules since the start, ranks measured
    summed = {DeviceInterval.ENERGY: torch.tensor(7.5), DeviceInterval.MEASURED: torch.tensor(1.0)}
    row = stats.metrics(summed, tokens=300, world_size=1)
    assert row["energy_j"] == 7.5 and row["joules_per_token"] == pytest.approx(0.025)
    assert "energy_j" not in stats.metrics(summed, tokens=300, world_size=2)  # one rank could not measure
