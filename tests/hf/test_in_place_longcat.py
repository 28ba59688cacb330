"""LongCat-Flash continued in place (moe/identity_experts.py): its router chooses among E experts and Z identity
("zero-computation") experts, a route to one adding the token times its weight. Against the stock
LongcatFlashForCausalLM (its probe: 8 experts, 2 identity experts, top-2): the same loss and gradients, every route
counted (those to identity experts as routes that ran no expert), the router entropy of its logits written out; its
correction bias moved for the experts and kept for the identity experts; a folder trained by train.py exports to a
folder stock transformers loads with the trained model's logits and the identity experts' gate_up_proj rows as
they were."""

from __future__ import annotations

import copy

import pytest
import torch
from in_place_checks import assert_stock_loss_and_gradients, train_three_steps
from transformers import AutoConfig, AutoModelForCausalLM, LongcatFlashForCausalLM

from moe_models.hf.exporter import export
from moe_models.hf.in_place import IDLE_GATE_UP_ROWS, sparse_blocks, swap_experts
from moe_models.hf.in_place_bias import correction_bias_problem, move_correction_biases
from moe_models.hf.in_place_load import load_in_place
from moe_models.hf.in_place_proof import probe_model
from moe_models.metrics.routing import routing_metrics
from moe_models.models.probe import small_moe_config
from moe_models.models.tokenization import byte_level_tokenizer
from moe_models.moe.identity_experts import IdentityExperts
from moe_models.moe.model_layers import MoELayers
from moe_models.run.folder import RunFolder

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
E, Z, K = 8, 2, 2  # the probe's experts, identity experts, top-k
RATE = 0.01


def stock_and_swapped() -> tuple[torch.nn.Module, torch.nn.Module, list[IdentityExperts]]:
    stock = probe_model(LongcatFlashForCausalLM, AutoConfig.for_model("longcat_flash")).train()
    swapped = copy.deepcopy(stock)
    return stock, swapped, swap_experts(swapped)


def router_calls(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Filled by each forward: each sparse block's (router input, top-k ids), as its router took and returned them."""
    calls = []
    for block in sparse_blocks(model):
        block.router.register_forward_hook(lambda m, args, out: calls.append((args[0].detach(), out[1])))
    return calls


def test_the_swapped_experts_give_the_stock_loss_and_gradients_and_count_identity_routes_as_running_none():
    stock, model, swapped = stock_and_swapped()
    assert stock.model.layers[0].mlp.experts.gate_up_proj.shape[0] == E + Z
    assert len(swapped) == 2 and all(isinstance(m, IdentityExperts) for m in swapped)
    calls = router_calls(stock)
    assert_stock_loss_and_gradients(stock, model, IDS)  # the stock gate_up_proj's Z rows: no gradient
    assert model.model.layers[0].mlp.experts.experts.gate_up_proj.shape[0] == E
    for block, layer, (hidden, ids_TK) in zip(stock.model.layers, swapped, calls):
        identity_TK = ids_TK >= E
        assert identity_TK.any() and not identity_TK.all()  # the probe routes to both kinds
        sums = layer.routing.sums(torch.device("cpu"))
        assert torch.equal(sums.kept_E, torch.bincount(ids_TK[~identity_TK], minlength=E).double())
        assert sums.null_routes == identity_TK.sum() and sums.tokens == IDS.numel()
        real_T = (~identity_TK).sum(dim=1)
        assert torch.equal(sums.real_per_token_K1, torch.bincount(real_T, minlength=K + 1).double())
        assert torch.equal(layer.last_topk_ids_TK, torch.where(identity_TK, -1, ids_TK))
        logits_TC = hidden.reshape(IDS.numel(), -1).float() @ block.mlp.router.classifier.weight.float().T
        entropy = -(torch.softmax(logits_TC, -1) * torch.log_softmax(logits_TC, -1)).sum()
        torch.testing.assert_close(sums.router_entropy, entropy.double(), rtol=1e-5, atol=0)
        metrics = routing_metrics(sums, E, K)
        assert metrics["real_experts_per_token"] == pytest.approx(real_T.double().mean().item())
        assert metrics["null_route_share"] == pytest.approx(identity_TK.double().mean().item())



def test_the_correction_bias_moves_for_the_experts_and_stays_for_the_identity_experts():
    stock, model, swapped = stock_and_swapped()
    assert correction_bias_problem(stock) is None
    move_correction_biases(model, RATE)
    layers = MoELayers(model)
    calls = router_calls(model)
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)
    layers.after_optimizer_step(applied=True)
    for block, (_, ids_TK) in zip(model.model.layers, calls):
        load_E = torch.bincount(ids_TK[ids_TK < E], minlength=E).double()
        assert (load_E != load_E.mean()).any()
        expected = torch.cat([RATE * torch.sign(load_E.mean() - load_E), torch.zeros(Z, dtype=torch.float64)])
        torch.testing.assert_close(block.mlp.router.e_score_correction_bias, expected.float(), rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def longcat_folder(tmp_path_factory):
    """A LongCat-Flash folder of the probe's sizes, fresh weights, the byte-level tokenizer: saved by transformers in
    the hub's per-expert layout, the identity experts' gate and up projections among them."""
    folder = tmp_path_factory.mktemp("longcat") / "folder"
    tokenizer = byte_level_tokenizer()
    config = small_moe_config(AutoConfig.for_model("longcat_flash", vocab_size=len(tokenizer)))
    torch.manual_seed(0)
    LongcatFlashForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_trained_longcat_folder_exports_to_a_folder_stock_transformers_loads_with_its_logits(longcat_folder,
                                                                                               tmp_path):
    """Three steps of train.py with the correction bias moving: the identity routes counted as running no expert,
    the export loaded by stock transformers with the trained model's logits, the experts' gate_up_proj rows trained
    and the identity experts' rows as in the source folder; it continues in place again (the second of two ranks)."""
    trained, last = train_three_steps(longcat_folder, tmp_path / "run", "--router_bias_update_rate", "1e-3")
    for i in range(2):
        routes, real = 2 * 32 * K, sum(last[f"moe/layer_{i}/routed_per_expert"])
        assert 0 < real < routes and last[f"moe/layer_{i}/null_route_share"] == pytest.approx(1 - real / routes)
        assert last[f"moe/layer_{i}/real_experts_per_token"] == pytest.approx(real / (2 * 32))
        assert len(last[f"moe/layer_{i}/score_bias"]) == E + Z and last[f"moe/layer_{i}/score_bias"][E:] == [0, 0]
    # the realised FLOPs leave the identity routes out: 6 x an expert's 3 F D parameters per route not run
    planned = RunFolder(tmp_path / "run").record().resolved.flops_per_token
    unspent = sum(6 * 3 * 32 * 64 * (K - last[f"moe/layer_{i}/real_experts_per_token"]) for i in range(2))
    assert last["flops_per_token_spent"] == pytest.approx(planned - unspent) and unspent > 0
    export(tmp_path / "run" / "checkpoints", tmp_path / "exported", tag="global_step3")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    source = AutoModelForCausalLM.from_pretrained(longcat_folder)
    assert type(stock) is LongcatFlashForCausalLM
    exported, before = stock.model.layers[0].mlp.experts.gate_up_proj, source.model.layers[0].mlp.experts.gate_up_proj
    assert exported.shape[0] == E + Z and (exported[:E] - before[:E]).abs().max() > 0  # trained, exported
    assert torch.equal(exported[E:], before[E:])
    with torch.no_grad():
        expected = trained(input_ids=IDS, use_cache=False).logits
        got = stock(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    again = load_in_place(tmp_path / "exported", ep_size=2, ep_rank=1)
    assert torch.equal(again.model.layers[0].mlp.experts.experts.gate_up_proj, exported[4:E])
    assert torch.equal(getattr(again.model.layers[0].mlp, IDLE_GATE_UP_ROWS), before[E:])
