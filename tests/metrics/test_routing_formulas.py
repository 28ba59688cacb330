"""The routing formulas on known values: imbalance and the mean pairwise cosine of expert weights."""

import math

import pytest
import torch

from moe_models.metrics.routing import imbalance, mean_pairwise_cosine


def test_imbalance_is_one_when_even_and_num_experts_when_collapsed():
    assert imbalance([5, 5, 5, 5]) == 1.0
    assert imbalance([20, 0, 0, 0]) == 4.0


def test_mean_pairwise_cosine_of_known_vectors():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    direction_sum = (vectors / vectors.norm(dim=1, keepdim=True)).sum(0)
    expected = (0.0 + 2 * (1 / math.sqrt(2))) / 3
    assert mean_pairwise_cosine(direction_sum.square().sum().item(), 3) == pytest.approx(expected)
