"""An HF MoE continued in place (moe_models/hf/in_place.py, moe/fused_experts.py): its experts swapped for DeepSpeed
MoE experts keep the stock class's function and gradients, are what DeepSpeed's engine treats as MoE parameters
(expert groups, one checkpoint file per expert, exact reload), and the proof refuses what it cannot prove."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from deepspeed.moe.layer import MoE
from transformers import AutoConfig, Qwen3MoeForCausalLM, ZayaForCausalLM

from moe_models.hf import in_place_proof
from moe_models.hf.in_place import fused_experts_of, sparse_blocks, swap_experts
from moe_models.hf.in_place_proof import probe_model, prove_in_place
from moe_models.moe.fused_experts import FusedExperts, LocalFusedExperts
from moe_models.run.cli import parse_args
from moe_models.training.ds_config import build_deepspeed_config
from moe_models.training.engine import build_engine, optimizer_param_groups

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def qwen3_moe_probe(seed: int = 0) -> torch.nn.Module:
    return probe_model(Qwen3MoeForCausalLM, AutoConfig.for_model("qwen3_moe"), seed=seed)


def test_swapped_experts_are_deepspeed_moe_experts_under_per_expert_names():
    model = qwen3_moe_probe()
    stock = {name: p.detach().clone() for name, p in model.named_parameters()}
    swapped = swap_experts(model)
    assert len(swapped) == 2 and all(isinstance(m, MoE) and m.num_local_experts == 8 for m in swapped)
    assert all(isinstance(block.router, torch.nn.Module) for block in sparse_blocks(model))  # the family's router
    for module in swapped:
        for param in module.parameters():
            assert param.allreduce is False and param.group_name == "ep_size_1"
    state = model.state_dict()
    expert_keys = [k for k in state if ".experts." in k]
    pattern = r"model\.layers\.[01]\.mlp\.experts\.deepspeed_moe\.experts\.deepspeed_experts\.[0-7]\." \
              r"(gate_up_proj|down_proj)"
    assert len(expert_keys) == 2 * 8 * 2 and all(re.fullmatch(pattern, k) for k in expert_keys), expert_keys[:4]
    # each entry is one expert's slice of the family's fused parameter
    key = "model.layers.1.mlp.experts.deepspeed_moe.experts.deepspeed_experts.5.gate_up_proj"
    assert torch.equal(state[key], stock["model.layers.1.mlp.experts.gate_up_proj"][5])
    other = qwen3_moe_probe(seed=3)
    swap_experts(other)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_the_engine_makes_expert_groups_saves_one_file_per_expert_and_reloads_exactly(world, tmp_path):
    cfg = parse_args(["--output_dir", str(tmp_path), "--warmup_steps", "1", "--learning_rate", "1e-3"])
    ds_config = build_deepspeed_config(cfg, world_size=1)
    model = qwen3_moe_probe().train()
    swap_experts(model)
    groups = [group for group in optimizer_param_groups(model, 0.0) if group.get("moe")]  # DeepSpeed's split
    expert_params = {id(p) for m in fused_experts_of(model) for p in m.parameters()}
    assert groups and {id(p) for g in groups for p in g["params"]} == expert_params
    engine = build_engine(model, ds_config, weight_decay=0.0)
    assert engine.has_moe_layers and engine.num_experts == [8, 8]
    loss = engine(input_ids=IDS, labels=IDS, use_cache=False).loss
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="one")
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert [f for f in files if f.startswith("layer_")] == sorted(
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(8))
    expert_file = torch.load(tmp_path / "one" / "layer_1_expert_5_mp_rank_00_model_states.pt")
    assert sorted(expert_file) == [f"model.layers.1.mlp.experts.deepspeed_moe.experts.deepspeed_experts.5.{name}"
                                   for name in ("down_proj", "gate_up_proj")]
    module = torch.load(tmp_path / "one" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert "model.layers.1.mlp.gate.weight" in module and not any(".experts." in k for k in module)

    other = qwen3_moe_probe(seed=3).train()
    swap_experts(other)
    resumed = build_engine(other, ds_config, weight_decay=0.0)
    resumed.load_checkpoint(str(tmp_path), tag="one")
    for (name, a), b in zip(engine.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(a, b), name
    for e in (engine, resumed):
        e.destroy()


def test_the_proof_refuses_an_expert_function_that_differs_from_the_family(monkeypatch):
    """The proof can fail: experts computing up * act(gate) on the wrong halves change the logits."""
    def swapped_halves(self, gate_up):
        up, gate = gate_up.chunk(2, dim=-1)
        return self.function.act_fn(gate) * up
    monkeypatch.setattr(LocalFusedExperts, "_gated", swapped_halves)
    monkeypatch.setattr(in_place_proof, "_PROVEN", {})
    with pytest.raises(ValueError, match=r"^model type 'qwen3_moe' cannot be continued in place: with swapped "
                                         r"experts its probe model's logits change .*; start from a dense model"):
        prove_in_place(Qwen3MoeForCausalLM, AutoConfig.for_model("qwen3_moe"))


def test_the_proof_refuses_a_router_the_swap_leaves_without_gradient(monkeypatch):
    """The proof can fail on gradients alone: routing weights detached before the experts keep the logits."""
    original = FusedExperts.forward
    monkeypatch.setattr(FusedExperts, "forward", lambda self, x, ids, w: original(self, x, ids, w.detach()))
    monkeypatch.setattr(in_place_proof, "_PROVEN", {})
    with pytest.raises(ValueError, match=r"cannot be continued in place: with swapped experts .*gate\.weight"):
        prove_in_place(Qwen3MoeForCausalLM, AutoConfig.for_model("qwen3_moe"))


def test_bad_input_is_refused_in_one_line_and_nothing_is_changed():
    model = qwen3_moe_probe()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^num_experts \(8\) at model\.layers\.0\.mlp\.experts must be divisible "
                                         r"by ep_size \(3\): pick an ep_size that divides 8$"):
        swap_experts(model, ep_size=3)
    assert not fused_experts_of(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.model.layers[0].mlp.experts.register_parameter("extra", torch.nn.Parameter(torch.zeros(8, 2)))
    with pytest.raises(ValueError, match=r"^model type 'qwen3_moe': at model\.layers\.0\.mlp\.experts, "
                                         r"Qwen3MoeExperts holds parameters other than the fused experts' \(extra\)"):
        swap_experts(model)
    assert not fused_experts_of(model)


def test_the_family_keeps_its_balance_loss_and_each_layer_counts_its_routes():
    stock = qwen3_moe_probe()
    model = copy.deepcopy(stock)
    swapped = swap_experts(model)
    model.train()
    expected = stock.train()(input_ids=IDS, labels=IDS, output_router_logits=True, use_cache=False)
    got = model(input_ids=IDS, labels=IDS, output_router_logits=True, use_cache=False)
    assert expected.aux_loss > 0 and torch.allclose(got.aux_loss, expected.aux_loss, rtol=1e-5)  # the family's
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
    sums = swapped[1].routing.sums(torch.device("cpu"))
    tokens, top_k = IDS.numel(), stock.config.num_experts_per_tok
    assert sums.tokens == tokens and sums.forwards == 1 and sums.kept_E.sum() == tokens * top_k
    assert sums.router_entropy > 0  # from the router's logits


def test_zaya_counts_its_routes_with_its_skip_class_as_the_stock_experts_see_them():
    """Zaya's router scores E experts and a skip class (E + 1 logits); its block hands a route to the skip class to
    the experts as expert 0 with weight 0. Its skip bias set to 0 here, so that some tokens choose it: every route
    counts as the stock block hands it to its experts, tokens x top-k in all, and the logits stay the stock ones."""
    stock = probe_model(ZayaForCausalLM, AutoConfig.for_model("zaya"))
    for block in sparse_blocks(stock):
        block.router.balancing_biases[-1] = 0.0
    model = copy.deepcopy(stock)
    swapped = swap_experts(model)
    chosen, skipped = [], []

    def keep(router, args, output):
        logits_TC, ids_TK = output[0], output[2]
        chosen.append(ids_TK)  # as the block hands them to its experts
        skipped.append((torch.softmax(logits_TC, -1) + router.balancing_biases).argmax(-1) == router.num_experts)

    for block in sparse_blocks(stock):
        block.router.register_forward_hook(keep)
    expected = stock.train()(input_ids=IDS, use_cache=False).logits
    got = model.train()(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    tokens, top_k = IDS.numel(), stock.config.num_experts_per_tok
    assert len(swapped) == len(chosen) >= 2 and top_k == 1 and any(s.any() for s in skipped)
    for layer, ids_TK in zip(swapped, chosen):
        sums = layer.routing.sums(torch.device("cpu"))
        assert sums.tokens == tokens and sums.kept_E.sum() == tokens * top_k
        assert torch.equal(sums.kept_E, torch.bincount(ids_TK.reshape(-1), minlength=8).double())
        assert sums.router_entropy > 0  # from the router's E + 1 logits


def test_bf16_and_activation_checkpointing():
    """bf16: the stock bf16 logits to bf16 rounding (the experts' outputs are summed in fp32 here, in bf16 by the
    stock loop); activation checkpointing: the same gradients as without, each forward's routes counted once."""
    stock = qwen3_moe_probe().to(torch.bfloat16)
    model = copy.deepcopy(stock)
    swap_experts(model)
    expected, got = logits_of(stock), logits_of(model)
    assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()

    plain = qwen3_moe_probe().train()
    swap_experts(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    for model in (plain, checkpointed):
        model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert fused_experts_of(checkpointed)[0].routing.sums(torch.device("cpu")).forwards == 1


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits.float()


def test_collapse_warnings_in_place_name_the_familys_own_balancing():
    """Our layer's --aux_loss_coef and router noise are refused in place: the warnings name the family's correction
    bias (DeepSeek-V3) or its balance loss's coefficient in config.json (OLMoE) instead."""
    from transformers import DeepseekV3ForCausalLM, OlmoeForCausalLM

    from moe_models.hf.in_place_bias import family_balance_fixes
    from moe_models.metrics.collapse import CollapseMonitor, CollapseThresholds
    from moe_models.run.config import MoEConfig
    deepseek = family_balance_fixes(probe_model(DeepseekV3ForCausalLM, AutoConfig.for_model("deepseek_v3")), 0.0)
    assert deepseek == ["aux-loss-free balancing, --router_bias_update_rate 1e-3 (now 0)"]
    olmoe = family_balance_fixes(probe_model(OlmoeForCausalLM, AutoConfig.for_model("olmoe")), 0.0)
    assert len(olmoe) == 1 and "router_aux_loss_coef" in olmoe[0] and \
        f"(now {AutoConfig.for_model('olmoe').router_aux_loss_coef:g})" in olmoe[0]
    monitor = CollapseMonitor(CollapseThresholds(), MoEConfig(), family_fixes=olmoe)
    assert monitor.balance_fixes({}) == olmoe
    assert "--aux_loss_coef" in " ".join(CollapseMonitor(CollapseThresholds(), MoEConfig()).balance_fixes({}))
