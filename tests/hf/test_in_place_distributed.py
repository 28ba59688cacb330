"""Experts swapped in place at ep_size 2 (two launcher ranks on CPU, all-to-all over gloo) give the ep_size 1 logits
and gradients (on batches padded differently on each rank, whose padding neither routes), and DeepSpeed engines
(ZeRO-2) at ep_size 1 and 2 the same losses and weights over four steps, for Qwen3-MoE (softmax top-k),
DeepSeek-V3 (sigmoid, correction bias, expert groups, shared experts and a dense first block), Llama 4 (its
expert-major block run sparsely, top-1), LongCat-Flash (identity experts, run on each token's own rank) and Aria
(experts that route themselves from the router's logits):
tests/scripts/in_place_ep.py checks them on each rank."""

from __future__ import annotations

import pytest
from helpers import launch

FAMILIES = ("qwen3_moe", "deepseek_v3", "llama4_text", "longcat_flash", "aria_text")


@pytest.mark.distributed
@pytest.mark.slow
def test_ep2_gives_the_ep1_logits_gradients_and_training_steps(tmp_path):
    output = launch(["tests/scripts/in_place_ep.py", str(tmp_path), *FAMILIES], num_ranks=2, timeout=300)
    for family in FAMILIES:
        for rank in range(2):
            assert f"OK {family} rank {rank}" in output and f"TRAINED {family} rank {rank}" in output, output[-4000:]
