"""The routing formulas on known values: imbalance, effective experts and the mean pairwise cosine of expert weights."""

import math

import pytest
import torch

from moe_models.metrics.routing import effective_experts, imbalance, mean_pairwise_cosine


def test_imbalance_is_one_when_even_and_num_experts_when_collapsed():
    assert imbalance([5, 5, 5, 5]) == 1.0
    assert imbalance([20, 0, 0, 0]) == 4.0


def test_effective_experts_is_the_number_of_experts_an_even_load_would_spread_over():
    assert effective_experts([5, 5, 5, 5]) == pytest.approx(4.0)
    assert effective_experts([20, 20, 0, 0]) == pytest.approx(2.0)  # top-2, every token to the same two
    assert effective_experts([20, 0, 0, 0]) == pytest.approx(1.0)
    shares = [0.5, 0.25, 0.25]
    assert effective_experts([2, 1, 1]) == pytest.approx(math.exp(-sum(p * math.log(p) for p in shares)))


def test_mean_pairwise_cosine_of_known_vectors():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    direction_sum = (vectors / vectors.norm(dim=1, keepdim=True)).sum(0)
    expected = (0.0 + 2 * (1 / math.sqrt(2))) / 3
    assert mean_pairwise_cosine(direction_sum.square().sum().item(), 3) == pytest.approx(expected)
