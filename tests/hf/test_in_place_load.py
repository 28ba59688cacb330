"""An HF MoE folder read in place (moe_models/hf/in_place_load.py): in the hub's per-expert layout (what
save_pretrained writes, Mixtral's renamed blocks too) and in the fused one, each expert-parallel rank reads only its
experts, and the model computes the stock class's logits; a broken folder is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoConfig, DeepseekV3ForCausalLM, GraniteMoeHybridForCausalLM, MixtralForCausalLM,
                          Qwen3MoeForCausalLM)

from moe_models.hf.in_place_load import load_in_place
from moe_models.hf.in_place_proof import probe_model
from moe_models.hf.load import SafetensorsFolder

FAMILIES = {"qwen3_moe": Qwen3MoeForCausalLM, "mixtral": MixtralForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM}
HUB_EXPERT_5 = {"qwen3_moe": "model.layers.1.mlp.experts.5.gate_proj.weight",
                "mixtral": "model.layers.1.block_sparse_moe.experts.5.w1.weight",
                "deepseek_v3": "model.layers.1.mlp.experts.5.gate_proj.weight"}
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))


def stock_probe(model_type: str) -> torch.nn.Module:
    model = probe_model(FAMILIES[model_type], AutoConfig.for_model(model_type))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero at init: a drawn one shows it is read
                buffer.copy_(torch.rand(buffer.shape, generator=torch.Generator().manual_seed(3)))
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, use_cache=False).logits


@pytest.fixture
def reads(monkeypatch):
    """The names (and row ranges of slices) the loader reads from the safetensors files."""
    seen = []
    tensor, slice_ = SafetensorsFolder.tensor, SafetensorsFolder.slice

    class Rows:
        def __init__(self, name, lazy):
            self.name, self.lazy = name, lazy

        def __getitem__(self, index):
            seen.append((self.name, index.start, index.stop))
            return self.lazy[index]

    monkeypatch.setattr(SafetensorsFolder, "tensor", lambda self, name: seen.append(name) or tensor(self, name))
    monkeypatch.setattr(SafetensorsFolder, "slice", lambda self, name: Rows(name, slice_(self, name)))
    return seen


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_hub_layout_loads_with_the_stock_logits_and_each_rank_reads_only_its_experts(model_type, tmp_path,
                                                                                         reads):
    stock = stock_probe(model_type)
    stock.save_pretrained(tmp_path)
    assert SafetensorsFolder(tmp_path, model_type).has(HUB_EXPERT_5[model_type]), "not the hub's per-expert layout"
    torch.testing.assert_close(logits(load_in_place(tmp_path)), logits(stock), rtol=0, atol=1e-5)

    reads.clear()
    half = load_in_place(tmp_path, ep_size=2, ep_rank=1)
    experts_read = {int(name.split(".experts.")[1].split(".")[0]) for name in reads
                    if isinstance(name, str) and ".experts." in name and "shared" not in name}
    assert experts_read == {4, 5, 6, 7}, experts_read
    stock_experts = {n: p for n, p in stock.named_parameters() if n.endswith(("experts.gate_up_proj",
                                                                               "experts.down_proj"))}
    for name, param in half.named_parameters():
        if ".deepspeed_moe." in name:
            assert torch.equal(param, stock_experts[name.replace(".deepspeed_moe.experts.", ".")][4:]), name
    for name, buffer in stock.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(half.get_buffer(name), buffer)


def test_the_fused_layout_reads_each_ranks_rows_only(tmp_path, reads):
    stock = stock_probe("qwen3_moe")
    stock.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(logits(load_in_place(tmp_path)), logits(stock), rtol=0, atol=1e-5)
    reads.clear()
    load_in_place(tmp_path, ep_size=2, ep_rank=0)
    expert_reads = [r for r in reads if ".experts." in (r[0] if isinstance(r, tuple) else r)]
    assert expert_reads and all(isinstance(r, tuple) and r[1:] == (0, 4) for r in expert_reads), expert_reads


def test_renames_written_as_escaped_patterns_are_read(tmp_path):
    """GraniteMoeHybrid's save_pretrained writes its router as `router.layer.weight` and its experts as
    `input_linear`/`output_linear`; transformers' mapping names them by regex (`router\\.layer\\.weight`)."""
    stock = probe_model(GraniteMoeHybridForCausalLM, AutoConfig.for_model("granitemoehybrid"))
    stock.save_pretrained(tmp_path)
    assert SafetensorsFolder(tmp_path, "granitemoehybrid").has("model.layers.0.block_sparse_moe.router.layer.weight")
    torch.testing.assert_close(logits(load_in_place(tmp_path)), logits(stock), rtol=0, atol=1e-5)


def test_a_broken_folder_is_refused_in_one_line(tmp_path):
    stock = stock_probe("qwen3_moe")
    stock.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in stock.state_dict().items()}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"names shard model-00001-of-00002\.safetensors, which is not in the folder"):
        load_in_place(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()

    expert = "model.layers.1.mlp.experts.down_proj"
    save_file({k: v for k, v in state.items() if k != expert}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has neither 'model\.layers\.1\.mlp\.experts\.down_proj' \(fused experts\) "
                                         r"nor 'model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight'"):
        load_in_place(tmp_path)
    save_file({**state, expert: state[expert][:, :, :16].contiguous()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint tensor for model\.layers\.1\.mlp\.experts\.deepspeed_moe\.experts"
                                         r"\.down_proj has shape \(8, 64, 16\), the model expects \(8, 64, 32\)"):
        load_in_place(tmp_path)
