"""Aria continued in place (moe/self_routing_experts.py): its block hands the experts the router's logits, and the
experts take each token's top-k by their own rule and run fc1 [E, D, 2F] / fc2 [E, F, D]. Against the stock
AriaTextForCausalLM (its probe: 8 experts, top-2, shared experts): the same loss and gradients under the family's
names, each layer's routes the top-k of the stock router's logits, the router entropy of those logits; a folder
trained by train.py exports to a folder stock transformers loads with the trained model's logits."""

from __future__ import annotations

import copy

import torch
from in_place_checks import assert_stock_loss_and_gradients, train_three_steps
from transformers import AriaTextForCausalLM, AutoConfig, AutoModelForCausalLM

from moe_models.hf.exporter import export
from moe_models.hf.in_place import sparse_blocks, swap_experts
from moe_models.hf.in_place_load import load_in_place
from moe_models.hf.in_place_proof import probe_model
from moe_models.models.probe import small_moe_config
from moe_models.models.tokenization import byte_level_tokenizer
from moe_models.moe.self_routing_experts import SelfRoutingExperts

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
E, K = 8, 2  # the probe's experts and top-k
FAMILY_NAMES = {"gate_up_proj": "fc1.weight", "down_proj": "fc2.weight"}  # AriaExperts' names of the fused weights


def aria_name(name: str) -> str:
    """A swapped model's parameter name as the stock class spells it (``...experts.fc1.weight``)."""
    holder, marker, fused = name.partition(".deepspeed_moe.experts.")
    return f"{holder}.{FAMILY_NAMES[fused]}" if marker else name


def test_the_swapped_experts_give_the_stock_loss_and_gradients_routing_by_the_stock_top_k():
    stock = probe_model(AriaTextForCausalLM, AutoConfig.for_model("aria_text")).train()
    model = copy.deepcopy(stock)
    swapped = swap_experts(model)
    assert len(swapped) == 2 and all(isinstance(m, SelfRoutingExperts) for m in swapped)
    logits = []
    for block in sparse_blocks(stock):
        block.router.register_forward_hook(lambda m, args, out: logits.append(out.detach()))
    assert_stock_loss_and_gradients(stock, model, IDS, aria_name)
    for layer, logits_TE in zip(swapped, logits):
        ids_TK = torch.topk(logits_TE, K, dim=1).indices
        assert torch.equal(layer.last_topk_ids_TK.sort(dim=1).values, ids_TK.sort(dim=1).values)
        sums = layer.routing.sums(torch.device("cpu"))
        assert torch.equal(sums.kept_E, torch.bincount(ids_TK.reshape(-1), minlength=E).double())
        entropy = -(torch.softmax(logits_TE, -1) * torch.log_softmax(logits_TE, -1)).sum()
        torch.testing.assert_close(sums.router_entropy, entropy.double(), rtol=1e-5, atol=0)


def test_a_trained_aria_folder_exports_to_a_folder_stock_transformers_loads_with_its_logits(tmp_path):
    """Three steps of train.py; the export's fc1/fc2 are the trained experts under the family's names, loaded by
    stock transformers with the trained model's logits; it continues in place again (the second of two ranks)."""
    tokenizer = byte_level_tokenizer()
    config = small_moe_config(AutoConfig.for_model("aria_text", vocab_size=len(tokenizer)))
    torch.manual_seed(0)
    AriaTextForCausalLM(config).save_pretrained(tmp_path / "folder")
    tokenizer.save_pretrained(tmp_path / "folder")
    trained, last = train_three_steps(tmp_path / "folder", tmp_path / "run")
    assert sum(last["moe/layer_0/routed_per_expert"]) == 2 * 32 * K
    export(tmp_path / "run" / "checkpoints", tmp_path / "exported", tag="global_step3")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "folder")
    assert type(stock) is AriaTextForCausalLM
    fc1 = stock.model.layers[0].mlp.experts.fc1.weight
    assert (fc1 - source.model.layers[0].mlp.experts.fc1.weight).abs().max() > 0  # trained, exported
    with torch.no_grad():
        expected = trained(input_ids=IDS, use_cache=False).logits
        got = stock(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    again = load_in_place(tmp_path / "exported", ep_size=2, ep_rank=1)
    assert torch.equal(again.model.layers[0].mlp.experts.experts.gate_up_proj, fc1[4:])
