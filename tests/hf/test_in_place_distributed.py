"""Experts swapped in place at ep_size 2 (two launcher ranks on CPU, all-to-all over gloo) give the ep_size 1 logits
and gradients, for Qwen3-MoE (softmax top-k) and DeepSeek-V3 (sigmoid, correction bias, expert groups, shared
experts and a dense first block): tests/scripts/in_place_ep.py checks them on each rank."""

from __future__ import annotations

import pytest
from helpers import launch

FAMILIES = ("qwen3_moe", "deepseek_v3")


@pytest.mark.distributed
@pytest.mark.slow
def test_ep2_gives_the_ep1_logits_and_gradients():
    output = launch(["tests/scripts/in_place_ep.py", *FAMILIES], num_ranks=2, timeout=300)
    for family in FAMILIES:
        for rank in range(2):
            assert f"OK {family} rank {rank}" in output, output[-4000:]
