"""Llama 4 continued in place (moe/expert_major_experts.py): its block runs every expert on every token, expert-major,
each row its token scaled by the router's sigmoid score; the swapped experts run each token's top-1 route alone.
Against the stock Llama4ForCausalLM, with a dense block before the sparse one (interleave_moe_layer_step 2): the same
loss and gradients, each layer's routes those the stock router chose, its metrics from the router's logits (not its
scores), padding left out; top-2 refused in one line; a folder trained by train.py exports to a folder stock
transformers loads with the trained model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from in_place_checks import assert_stock_loss_and_gradients, train_three_steps
from transformers import AutoConfig, AutoModelForCausalLM, Llama4ForCausalLM, Llama4ForConditionalGeneration

from moe_models.hf.exporter import export
from moe_models.hf.in_place import fused_experts_of, sparse_blocks, swap_experts
from moe_models.hf.in_place_balance import has_balance_loss, use_family_balance_loss
from moe_models.hf.in_place_bias import family_balance_fixes
from moe_models.hf.in_place_load import load_in_place
from moe_models.hf.in_place_proof import probe_model, prove_in_place
from moe_models.models.probe import small_moe_config
from moe_models.models.tokenization import byte_level_tokenizer
from moe_models.moe.expert_major_experts import ExpertMajorExperts
from moe_models.moe.model_layers import MoELayers

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def interleaved_config(**changes) -> AutoConfig:
    """Llama 4's config with a dense block before each sparse one (as Maverick's), two blocks once made small."""
    return AutoConfig.for_model("llama4_text", num_hidden_layers=4, interleave_moe_layer_step=2, **changes)


def stock_and_swapped() -> tuple[torch.nn.Module, torch.nn.Module, list[ExpertMajorExperts]]:
    stock = probe_model(Llama4ForCausalLM, interleaved_config()).train()
    swapped = copy.deepcopy(stock)
    return stock, swapped, swap_experts(swapped)


def test_the_swapped_experts_give_the_stock_loss_and_gradients_routing_each_token_to_its_top_1():
    stock, model, swapped = stock_and_swapped()
    assert [layer.is_moe_layer for layer in stock.model.layers] == [False, True]
    assert [b.path for b in sparse_blocks(model)] == ["model.layers.1.feed_forward"]
    assert len(swapped) == 1 and isinstance(swapped[0], ExpertMajorExperts)
    logits = []
    stock.model.layers[1].feed_forward.router.register_forward_hook(lambda m, a, out: logits.append(out[1]))
    assert_stock_loss_and_gradients(stock, model, IDS)
    # routes and metrics: the stock router's top-1 choices, and the entropy of its logits' softmax
    logits_TE = logits[0].detach()
    sums = swapped[0].routing.sums(torch.device("cpu"))
    assert sums.tokens == IDS.numel() and sums.forwards == 1
    assert torch.equal(sums.kept_E, torch.bincount(logits_TE.argmax(-1), minlength=8).double())
    entropy = -(torch.softmax(logits_TE, -1) * torch.log_softmax(logits_TE, -1)).sum()
    torch.testing.assert_close(sums.router_entropy, entropy.double(), rtol=1e-5, atol=0)


def test_padding_is_routed_by_the_router_and_left_out_of_the_experts_and_their_counts():
    stock, model, swapped = stock_and_swapped()
    mask_BS = torch.ones_like(IDS)
    mask_BS[0, 16:] = 0  # the first row ends in 8 pad tokens
    MoELayers(model).ignore_padding(mask_BS, torch.device("cpu"))
    with torch.no_grad():
        expected = stock(input_ids=IDS, attention_mask=mask_BS, use_cache=False).logits
        got = model(input_ids=IDS, attention_mask=mask_BS, use_cache=False).logits
    real_BS = mask_BS.bool()
    torch.testing.assert_close(got[real_BS], expected[real_BS], rtol=0, atol=1e-5 * expected.abs().max().item())
    ids_BS = swapped[0].last_topk_ids_TK.view(2, 24)
    assert (ids_BS[~real_BS] == -1).all() and (ids_BS[real_BS] >= 0).all()
    assert swapped[0].routing.sums(torch.device("cpu")).kept_E.sum() == real_BS.sum()


def test_a_top_2_router_is_refused_in_one_line():
    config = interleaved_config(num_experts_per_tok=2)
    with pytest.raises(ValueError, match=r"^model type 'llama4_text': at model\.layers\.1\.feed_forward\.experts, "
                                         r"Llama4Router routes top-2: each of a token's routes would carry its own "
                                         r"input .* only top-1 is continued in place .*; start from a dense model"):
        prove_in_place(Llama4ForCausalLM, config)
    model = probe_model(Llama4ForCausalLM, config)
    with pytest.raises(ValueError, match=r"^model type 'llama4_text': at model\.layers\.1\.feed_forward\.experts, "
                                         r"Llama4Router routes top-2:[^\n]*$"):
        swap_experts(model)
    assert not fused_experts_of(model)


def test_llama4_has_no_balance_loss_so_its_router_logits_stay_as_loaded():
    """Llama4ForCausalLM's loss is the LM loss alone, with output_router_logits on or off (transformers 5.17): the run
    leaves the flag as loaded and trains on that loss."""
    stock, model, _ = stock_and_swapped()
    with torch.no_grad():
        plain = stock(input_ids=IDS, labels=IDS, use_cache=False).loss
        flagged = stock(input_ids=IDS, labels=IDS, use_cache=False, output_router_logits=True)
    assert not hasattr(flagged, "aux_loss") and torch.equal(flagged.loss, plain)
    assert not has_balance_loss(model)
    use_family_balance_loss(model)
    assert model.config.output_router_logits is False
    # the collapse warnings advise no coefficient that the class does not use (no correction bias either)
    assert family_balance_fixes(model, 0.0) == ["a lower --learning_rate: the family has neither a correction bias "
                                                "nor a balance loss"]


@pytest.fixture(scope="module")
def llama4_folder(tmp_path_factory):
    """A Llama 4 folder as the hub's Scout and Maverick are: Llama4ForConditionalGeneration (a vision tower, the causal
    LM under ``language_model.``), its config made small with a dense block before the sparse one, fresh weights, and
    the byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("llama4") / "folder"
    config = small_moe_config(AutoConfig.for_model("llama4"))
    tokenizer = byte_level_tokenizer()
    config.text_config = small_moe_config(interleaved_config(vocab_size=len(tokenizer)))
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_trained_llama4_folder_exports_to_a_folder_stock_transformers_loads_with_its_logits(llama4_folder, tmp_path):
    """The multimodal folder is read as its causal LM (what AutoModelForCausalLM loads of it), trained three steps, and
    exported as that class: stock transformers loads it with the trained model's logits, and it continues in place
    again (the second of two ranks reading experts 4-7)."""
    trained, last = train_three_steps(llama4_folder, tmp_path / "run")
    assert sum(last["moe/layer_0/routed_per_expert"]) == 2 * 32 and "moe/layer_1/routed_per_expert" not in last
    export(tmp_path / "run" / "checkpoints", tmp_path / "exported", tag="global_step3")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    source = AutoModelForCausalLM.from_pretrained(llama4_folder)
    assert type(stock) is type(source) is Llama4ForCausalLM
    experts = stock.model.layers[1].feed_forward.experts.gate_up_proj
    assert (experts - source.model.layers[1].feed_forward.experts.gate_up_proj).abs().max() > 0  # trained, exported
    with torch.no_grad():
        expected = trained(input_ids=IDS, use_cache=False).logits
        got = stock(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    where = ("_name_or_path", "architectures")  # the source's text config, under the exported class's name
    assert {k: v for k, v in stock.config.to_dict().items() if k not in where} == \
        {k: v for k, v in source.config.to_dict().items() if k not in where}
    assert stock.config.model_type == "llama4_text" and stock.config.architectures == ["Llama4ForCausalLM"]
    again = load_in_place(tmp_path / "exported", ep_size=2, ep_rank=1)
    assert torch.equal(again.model.layers[1].feed_forward.experts.experts.gate_up_proj, experts[4:])
