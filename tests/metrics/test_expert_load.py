"""The expert-load table and heatmap that wandb and tensorboard get at each eval, from hand-made rows."""

import numpy as np
import pytest

from moe_models.metrics.expert_load import expert_load_figure, figure_pixels, route_shares, routing_table

TRAINING = {"step": 6, "loss": 2.0,
            "moe/layer_0/routed_per_expert": [6, 2, 0, 8], "moe/layer_0/tokens_per_expert": [5, 2, 0, 8],
            "moe/layer_0/imbalance": 2.0, "moe/layer_0/drop_fraction": 0.0625,
            "moe/layer_1/routed_per_expert": [3, 1], "moe/layer_1/tokens_per_expert": [3, 1],
            "moe/layer_1/imbalance": 1.5, "moe/layer_1/drop_fraction": 0.0, "moe/layer_1/score_bias": [0.5, -0.5]}
EVAL = {"step": 6, "eval_loss": 2.1, "moe/layer_0/expert_similarity": 0.9, "moe/layer_1/expert_similarity": 0.8}


def test_the_table_has_a_line_per_layer_and_expert_with_the_layer_values_repeated():
    columns, rows = routing_table(TRAINING, EVAL)
    assert columns == ["layer", "expert", "routes", "share", "kept", "score_bias", "drop_fraction",
                       "expert_similarity", "imbalance"]
    assert rows == [[0, 0, 6, 0.375, 5, None, 0.0625, 0.9, 2.0],
                    [0, 1, 2, 0.125, 2, None, 0.0625, 0.9, 2.0],
                    [0, 2, 0, 0.0, 0, None, 0.0625, 0.9, 2.0],
                    [0, 3, 8, 0.5, 8, None, 0.0625, 0.9, 2.0],
                    [1, 0, 3, 0.75, 3, 0.5, 0.0, 0.8, 1.5],
                    [1, 1, 1, 0.25, 1, -0.5, 0.0, 0.8, 1.5]]


def test_without_an_eval_row_or_routes_the_table_still_holds_every_expert():
    idle = {**TRAINING, "moe/layer_1/routed_per_expert": [0, 0]}
    columns, rows = routing_table(idle)
    assert "expert_similarity" not in columns
    assert [row[3] for row in rows if row[0] == 1] == [0.0, 0.0]  # no routes: share 0, not a division by zero


def test_shares_of_layers_with_fewer_experts_are_padded():
    layers, shares = route_shares(TRAINING)
    assert layers == [0, 1]
    np.testing.assert_array_equal(shares, [[0.375, 0.125, 0.0, 0.5], [0.75, 0.25, np.nan, np.nan]])


def test_the_heatmap_draws_and_changes_with_the_load():
    pixels = figure_pixels(expert_load_figure(TRAINING))
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] > 100 and pixels.shape[1] > 200
    even = {**TRAINING, "moe/layer_0/routed_per_expert": [4, 4, 4, 4]}
    assert not np.array_equal(figure_pixels(expert_load_figure(even)), pixels)


@pytest.mark.parametrize("experts, layers", [(4, 1), (64, 24), (256, 60)])
def test_the_heatmap_stays_a_readable_size(experts, layers):
    row = {"step": 1, "loss": 1.0, **{f"moe/layer_{i}/routed_per_expert": list(range(experts)) for i in range(layers)}}
    height, width, _ = figure_pixels(expert_load_figure(row)).shape
    assert min(25 * experts, 1600) <= width <= 1900 and min(20 * layers, 1600) <= height <= 1800
