"""Expert statistics summed over 2 expert-parallel CPU ranks through the real deepspeed launcher: routing counters,
expert similarity, routes per (domain, expert)."""

import json
import math

import pytest
import torch

from helpers import launch
from moe_models.metrics.collapse import console_line
from moe_models.metrics.specialisation import mutual_information_bits

pytestmark = pytest.mark.distributed


def test_expert_counts_add_up_over_two_ep_ranks(tmp_path):
    out = tmp_path / "run"
    output = launch(["train.py", "--ep_size", "2", "--num_experts", "4", "--top_k", "2", "--drop_tokens", "true",
                     "--capacity_factor", "0.5",
                     "--max_steps", "4", "--logging_steps", "2", "--eval_steps", "4", "--max_eval_batches", "2",
                     "--warmup_steps", "1", "--synthetic_examples", "1000", "--block_size", "64",
                     "--per_device_train_batch_size", "4", "--expert_init", "copy_noise", "--expert_noise_std", "0.5",
                     "--peak_tflops", "0.01", "--eval_capacity_factor", "4", "--collapse_imbalance", "1.0001",
                     "--collapse_dead_expert_share", "0",
                     "--collapse_min_tokens", "512",
                     "--disable_tqdm", "--output_dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4]
    # dropping tokens: said at the start, once (rank 0), with the flag that makes the export exact
    notes = [line for line in output.splitlines() if line.startswith("note: ")]
    assert notes == ["note: this run's checkpoints will export to Mixtral inexactly (Mixtral routes every token, to "
                     "the top-k scores; this run drops tokens above expert capacity): --drop_tokens false would make "
                     "the export exact (docs/export.md)"], output[-3000:]
    for row, steps in zip(train_rows, [1, 1, 2]):
        tokens = steps * 2 * 4 * 64  # steps x ranks x sequences x block
        assert row["tokens_per_sec_per_device"] == pytest.approx(row["tokens_per_sec"] / 2)
        assert "mfu" in row and "cpu_rss_gib" in row
        for i in range(4):
            layer = {key.split("/")[-1]: value for key, value in row.items() if key.startswith(f"moe/layer_{i}/")}
            assert layer["routed_tokens"] == tokens  # both ranks' tokens, the whole interval
            assert sum(layer["routed_per_expert"]) == tokens * 2
            assert sum(layer["tokens_per_expert"]) == tokens * 2 - layer["dropped"]
            assert layer["dropped"] > 0 and len(layer["tokens_per_expert"]) == 4
            if steps == 1:  # the interval is its last step: MaxVio of the global batch is the interval's imbalance - 1
                assert layer["max_violation_step"] == pytest.approx(layer["imbalance"] - 1)
            assert layer["max_violation_micro_batch"] >= 0
    # Experts 0-1 live on rank 0 and 2-3 on rank 1; the similarity gathered at the last eval must equal
    # the one computed from the four expert files saved right after it.
    eval_row = [r for r in rows if "eval_loss" in r][-1]
    step_dir = out / "checkpoints" / "global_step4"
    flat = []
    for expert in range(4):
        state = torch.load(step_dir / f"layer_0_expert_{expert}_mp_rank_00_model_states.pt", weights_only=False)
        flat.append(torch.cat([t.double().flatten() for t in state.values()]))
    flat_EP = torch.stack(flat)
    cosine_EE = torch.nn.functional.cosine_similarity(flat_EP[:, None], flat_EP[None, :], dim=-1)
    expected = cosine_EE[torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)].mean().item()
    assert expected < 0.95  # noisy copies: the test can tell the experts apart
    assert eval_row["moe/layer_0/expert_similarity"] == pytest.approx(expected, rel=1e-5)
    # Routes per (domain, expert) at eval: global expert ids of each rank's own tokens, summed over both ranks. Eval
    # capacity 4 x the even share keeps every route, and every token of the built-in corpus has a domain.
    resolved = json.loads((out / "run_config.json").read_text())["resolved"]
    blocks_per_rank = min(math.ceil(resolved["validation_blocks"] / 2), 2 * 8)  # DistributedSampler; 2 batches of 8
    for i in range(4):
        counts = eval_row[f"moe/layer_{i}/domain_expert_counts"]
        assert len(counts) == len(resolved["domains"]) and all(len(row) == 4 for row in counts)
        assert sum(map(sum, counts)) == 2 * blocks_per_rank * 64 * 2  # ranks x blocks x tokens x top-2
        assert eval_row[f"moe/layer_{i}/domain_mutual_information"] == pytest.approx(mutual_information_bits(counts))
    # A collapse threshold any uneven load passes: rank 0 warns once per layer, in metrics.jsonl and on its console.
    warnings = [r for r in rows if r.get("collapse") == "warning"]
    assert sorted((w["layer"], w["condition"], w["step"]) for w in warnings) == [(i, "imbalance", 2) for i in range(4)]
    assert all(output.count(console_line(w)) == 1 for w in warnings)
