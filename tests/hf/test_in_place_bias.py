"""Aux-loss-free balancing in place (hf/in_place_bias.py) moves a correction bias that is not named
e_score_correction_bias: AFMoE's ``expert_bias`` (a parameter without gradient, in the sparse block) and LFM2-MoE's
(a buffer). On each family's probe: one step moves it by bias_e += rate x sign(mean load - load_e) (the
rule written out here), the loads counted from the top-k ids the family's router returned, held in fp32 (also in a
bf16 model) outside the gradient and logged as moe/layer_i/score_bias; the stock class, given the moved bias under its own name, chooses the experts the
continued model chooses, and not those it chose before the move."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AfmoeForCausalLM, AutoConfig, Lfm2MoeForCausalLM

from moe_models.hf.in_place import sparse_blocks, swap_experts
from moe_models.hf.in_place_bias import move_correction_biases
from moe_models.hf.in_place_proof import probe_model
from moe_models.moe.model_layers import MoELayers

RATE = 0.01
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def chosen_experts(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each sparse block's top-k ids of one forward of IDS, as its router returned them."""
    chosen = []
    hooks = [block.router.register_forward_hook(lambda module, args, output: chosen.append(output[2]))
             for block in sparse_blocks(model)]
    model(input_ids=IDS, use_cache=False)
    for hook in hooks:
        hook.remove()
    return chosen


@pytest.mark.parametrize("model_type, model_class", [("afmoe", AfmoeForCausalLM), ("lfm2_moe", Lfm2MoeForCausalLM)])
def test_expert_bias_moves_by_the_sign_rule_and_the_stock_forward_chooses_by_it(model_type, model_class):
    stock = probe_model(model_class, AutoConfig.for_model(model_type))
    in_bf16 = copy.deepcopy(stock).to(torch.bfloat16)
    swap_experts(in_bf16)
    move_correction_biases(in_bf16, RATE)
    assert all(block.block.expert_bias.dtype == torch.float32 for block in sparse_blocks(in_bf16))
    model = copy.deepcopy(stock)
    swapped = swap_experts(model)
    move_correction_biases(model, RATE)
    blocks = sparse_blocks(model)
    assert not [name for name, _ in model.named_parameters() if name.endswith("expert_bias")]  # outside the gradient
    layers = MoELayers(model)
    model.train()
    before = chosen_experts(model)
    layers.after_optimizer_step(applied=True)

    top_k, num_experts = stock.config.num_experts_per_tok, swapped[0].num_experts
    for block, chosen in zip(blocks, before):
        load_E = torch.bincount(chosen.reshape(-1), minlength=num_experts).double()
        assert load_E.sum() == IDS.numel() * top_k and (load_E != load_E.mean()).any()
        expected = RATE * torch.sign(load_E.mean() - load_E).float()  # from a zero bias
        assert torch.allclose(block.block.expert_bias, expected, rtol=0, atol=1e-9)
    row = layers.interval_metrics(layers.interval_sums(torch.device("cpu")))
    for i, block in enumerate(blocks):
        assert row[f"moe/layer_{i}/score_bias"] == block.block.expert_bias.tolist()

    moved = {name: tensor for name, tensor in model.state_dict().items() if name.endswith("expert_bias")}
    assert len(moved) == len(blocks) >= 1
    assert not stock.load_state_dict(moved, strict=False).unexpected_keys  # the family's own name
    after = chosen_experts(model)
    for stock_chosen, got, earlier in zip(chosen_experts(stock), after, before):
        assert torch.equal(stock_chosen.sort(dim=-1).values, got.sort(dim=-1).values)
        assert not torch.equal(got.sort(dim=-1).values, earlier.sort(dim=-1).values)
