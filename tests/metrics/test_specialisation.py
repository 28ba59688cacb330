"""Specialisation by domain: the I(domain; expert) estimator on hand-made routings, and the eval rows of a run on the
built-in corpus (the counts of real layers: tests/moe/test_routing_counters.py)."""

import json
import math

import matplotlib.image
import pytest
import torch

from moe_models.metrics.specialisation import (domain_expert_counts, entropy_bits, mutual_information_bits,
                                               specialisation_metrics)
from moe_models.report import main as report_main
from moe_models.run.cli import parse_args
from train import build


def test_independent_domain_and_expert_give_zero_bits():
    # Every domain spreads its routes over the experts in the same proportions 1 : 2 : 3.
    counts = [[2, 4, 6], [1, 2, 3], [5, 10, 15]]
    assert mutual_information_bits(counts) == pytest.approx(0.0, abs=1e-12)
    assert specialisation_metrics(counts)["domain_mutual_information_normalised"] == pytest.approx(0.0, abs=1e-12)


def test_one_expert_set_per_domain_gives_the_domain_entropy():
    # Domain 0 goes to expert 0 only, domain 1 to experts 2 and 3: the expert tells the domain.
    counts = [[6, 0, 0, 0], [0, 0, 3, 1]]
    domain_entropy = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert entropy_bits([6, 4]) == pytest.approx(domain_entropy)
    assert mutual_information_bits(counts) == pytest.approx(domain_entropy)
    metrics = specialisation_metrics(counts)
    assert metrics["domain_mutual_information"] == pytest.approx(domain_entropy)
    assert metrics["domain_mutual_information_normalised"] == pytest.approx(1.0)
    assert metrics["domain_expert_counts"] == counts
    # Four equally frequent domains, one expert each: 2 bits.
    assert mutual_information_bits([[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0], [0, 0, 0, 5]]) == pytest.approx(2.0)


def test_a_mixed_routing_matches_the_formula_written_out():
    # p(d, e) = 3/8 on the diagonal, 1/8 off it; p(d) = p(e) = 1/2:
    # I = 2 x 3/8 log2((3/8) / (1/4)) + 2 x 1/8 log2((1/8) / (1/4)) = 3/4 log2(3/2) - 1/4.
    expected = 0.75 * math.log2(1.5) - 0.25
    assert mutual_information_bits([[3, 1], [1, 3]]) == pytest.approx(expected)
    assert specialisation_metrics([[3, 1], [1, 3]])["domain_mutual_information_normalised"] == pytest.approx(expected)


def test_a_single_domain_has_no_normalised_value_and_no_routes_no_values():
    assert set(specialisation_metrics([[4, 2, 0]])) == {"domain_expert_counts", "domain_mutual_information"}
    assert specialisation_metrics([[0, 0], [0, 0]]) == {}


def test_counts_skip_dropped_routes_and_tokens_without_a_domain():
    topk_ids_TK = torch.tensor([[0, 1], [2, -1], [1, 2], [0, 2], [3, 0]])
    domain_ids_T = torch.tensor([0, 1, 1, -1, 0])
    expected = [[2, 1, 0, 1],   # token 0 -> 0, 1; token 4 -> 3, 0
                [0, 1, 2, 0]]   # token 1 -> 2 (its second route dropped); token 2 -> 1, 2; token 3: no domain
    assert domain_expert_counts(topk_ids_TK, domain_ids_T, 2, 4).tolist() == expected


FLAGS = ["--num_experts", "4", "--top_k", "2", "--drop_tokens", "false", "--max_steps", "3", "--logging_steps", "1",
         "--eval_steps", "3", "--max_eval_batches", "2", "--per_device_eval_batch_size", "3", "--warmup_steps", "1",
         "--synthetic_examples", "600", "--block_size", "32", "--per_device_train_batch_size", "4", "--disable_tqdm"]


def test_eval_rows_hold_the_routes_per_domain_of_every_layer_and_the_report_draws_them(world, tmp_path):
    out = tmp_path / "run"
    _, trainer = build(parse_args([*FLAGS, "--output_dir", str(out)]))
    trainer.train()
    domains = json.loads((out / "run_config.json").read_text())["resolved"]["domains"]
    assert trainer.domains == domains and len(domains) > 1
    # The eval tokens of each domain, read from the eval set itself: the first 2 batches of 3 blocks.
    domain_ids = torch.tensor(trainer.eval_set.select(range(6))["domain_ids"])
    tokens_per_domain = [(domain_ids == d).sum().item() for d in range(len(domains))]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eval_row, = [r for r in rows if "eval_loss" in r]
    for i in range(4):  # tiny-llama: 4 MoE layers
        counts = eval_row[f"moe/layer_{i}/domain_expert_counts"]
        assert len(counts) == len(domains) and all(len(row) == 4 for row in counts)
        assert [sum(row) for row in counts] == [2 * n for n in tokens_per_domain]  # top-2, dropless
        information = eval_row[f"moe/layer_{i}/domain_mutual_information"]
        assert information == pytest.approx(mutual_information_bits(counts))
        assert eval_row[f"moe/layer_{i}/domain_mutual_information_normalised"] == pytest.approx(
            information / entropy_bits(tokens_per_domain))
    assert not any("domain" in key for r in rows if "loss" in r for key in r)  # eval rows only
    # Loss per domain: each target token counts in its own position's domain; every token of the built-in corpus has
    # one, so the per-domain losses weighted by their target tokens give back the eval loss.
    targets = [(domain_ids[:, 1:] == d).sum().item() for d in range(len(domains))]
    losses = {name: eval_row[f"eval_loss/{name}"] for name, n in zip(domains, targets) if n}
    assert len(losses) > 1 and len(set(losses.values())) == len(losses)
    weighted = sum(losses[name] * n for name, n in zip(domains, targets) if n) / sum(targets)
    assert weighted == pytest.approx(eval_row["eval_loss"], rel=1e-5)
    report_main([str(out)])
    summary = (out / "report" / "summary.txt").read_text()
    for i in range(4):
        image = matplotlib.image.imread(out / "report" / f"domain_experts_layer_{i}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        information = eval_row[f"moe/layer_{i}/domain_mutual_information"]
        assert f"moe layer {i}: I(domain; expert) {information:.3f} bits" in summary
