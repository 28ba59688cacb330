"""Importing an HF MoE checkpoint at ep_size 2: each rank builds and reads only its own experts, by global id."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_models.models.tokenization import byte_level_tokenizer
from helpers import launch

pytestmark = pytest.mark.distributed


def test_each_rank_imports_its_own_experts(tmp_path):
    config = AutoConfig.for_model("mixtral", vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(tmp_path / "mixtral")  # the hub's layout: one tensor per expert
    byte_level_tokenizer().save_pretrained(tmp_path / "mixtral")

    out = tmp_path / "run"
    launch(["tests/scripts/probe.py", "--steps", "1", "--model_name_or_path", str(tmp_path / "mixtral"),
            "--ep_size", "2", "--drop_tokens", "false", "--synthetic_examples", "500", "--block_size", "64",
            "--per_device_train_batch_size", "4", "--max_steps", "1", "--warmup_steps", "1", "--deepspeed", "zero2",
            "--disable_tqdm", "--output_dir", str(out)])
    records = [torch.load(out / f"probe_rank{rank}.pt", weights_only=False) for rank in range(2)]

    assert [sorted({gid for _, gid, _ in r["initial"]}) for r in records] == [[0, 1], [2, 3]]
    total = sum(p.numel() for p in hf.parameters())
    expert_params = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    assert [r["parameters"] for r in records] == [total - expert_params // 2] * 2
    ffn_size = config.intermediate_size
    for record in records:
        for (layer, gid, name), tensor in record["initial"].items():
            experts = hf.model.layers[layer].mlp.experts
            expected = {"gate_proj.weight": experts.gate_up_proj[gid, :ffn_size],
                        "up_proj.weight": experts.gate_up_proj[gid, ffn_size:],
                        "down_proj.weight": experts.down_proj[gid]}[name]
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
