"""Padding that routing ignores, in place (moe/fused_experts.py, moe/padding.py): a DeepSeek-V3 probe continued in
place, given a right-padded batch and its attention mask (MoELayers.ignore_padding), counts, logs and balances by
the routes of its real tokens alone. The reference is the stock model (its own eager experts) run on each row's real
tokens alone, its routers' choices and logits read by hooks, and the bias update written out from them."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, DeepseekV3ForCausalLM

from moe_models.hf.in_place import sparse_blocks, swap_experts
from moe_models.hf.in_place_bias import move_correction_biases
from moe_models.hf.in_place_proof import probe_model
from moe_models.metrics.routing import routing_metrics
from moe_models.moe.model_layers import MoELayers

RATE = 0.01
LENGTHS = (11, 6)  # each row's real tokens, then padding to 16
ATTENTION_MASK = torch.tensor([[1] * n + [0] * (16 - n) for n in LENGTHS])
IDS = torch.randint(0, 256, ATTENTION_MASK.shape, generator=torch.Generator().manual_seed(2))


def stock_routes_of_real_tokens(stock: torch.nn.Module) -> tuple[list, list, torch.Tensor]:
    """Per sparse block: the stock routers' top-k ids and logits over every row's real tokens, each row run alone
    (no padding at all); and those rows' logits, concatenated."""
    chosen, logits = [[] for _ in sparse_blocks(stock)], [[] for _ in sparse_blocks(stock)]

    def keep(i, output):
        logits[i].append(output[0])
        chosen[i].append(output[2])

    hooks = [block.router.register_forward_hook(lambda module, args, output, i=i: keep(i, output))
             for i, block in enumerate(sparse_blocks(stock))]
    with torch.no_grad():
        rows = [stock(input_ids=IDS[row, :n].unsqueeze(0), use_cache=False).logits[0]
                for row, n in enumerate(LENGTHS)]
    for hook in hooks:
        hook.remove()
    return [torch.cat(c) for c in chosen], [torch.cat(lg) for lg in logits], torch.cat(rows)


def test_a_padded_batch_counts_logs_and_moves_the_bias_by_its_real_tokens_alone(world):
    stock = probe_model(DeepseekV3ForCausalLM, AutoConfig.for_model("deepseek_v3"))
    model = copy.deepcopy(stock)
    swapped = swap_experts(model)
    move_correction_biases(model, RATE)
    layers = MoELayers(model)
    model.train()
    layers.ignore_padding(ATTENTION_MASK, torch.device("cpu"))
    out = model(input_ids=IDS, attention_mask=ATTENTION_MASK, use_cache=False).logits
    metrics = [routing_metrics(layer.routing.sums(torch.device("cpu")), 8, 2) for layer in swapped]
    loads = [layer.step_load.local_E.clone() for layer in swapped]
    layers.after_optimizer_step(applied=True)

    chosen, router_logits, alone = stock_routes_of_real_tokens(stock)
    real = ATTENTION_MASK.bool()
    torch.testing.assert_close(out[real], alone, rtol=0, atol=1e-5)  # the padding changes no real token's output
    assert len(swapped) == len(chosen) >= 1
    for i, (layer, ids_NK, logits_NE) in enumerate(zip(swapped, chosen, router_logits)):
        load_E = torch.bincount(ids_NK.reshape(-1), minlength=8)
        assert load_E.sum() == sum(LENGTHS) * 2  # 17 real tokens x top-2, not 32 tokens x 2
        assert metrics[i]["routed_per_expert"] == load_E.tolist() and metrics[i]["routed_tokens"] == sum(LENGTHS)
        assert torch.equal(loads[i], load_E)
        assert metrics[i]["max_violation_micro_batch"] == load_E.max().item() / load_E.double().mean().item() - 1
        probs_NE = logits_NE.softmax(dim=-1)
        entropy = -(probs_NE * probs_NE.log()).sum(dim=-1).mean()
        assert abs(metrics[i]["router_entropy"] - entropy.item()) < 1e-5
        # bias_e = 0 + rate x sign(mean load - load_e), the loads those of the real tokens
        expected = RATE * torch.sign(load_E.double().mean() - load_E).float()
        assert (load_E != load_E.double().mean()).any()
        torch.testing.assert_close(layer.correction_bias.tensor(), expected, rtol=0, atol=1e-9)
        pads = layer.last_topk_ids_TK.view(2, 16, 2)[~real]
        assert (pads == -1).all()  # eval counts (domain routes) skip the padding too
