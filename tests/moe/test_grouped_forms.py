"""--moe_impl grouped on every FFN form (fused gate_up, biases per route, Conv1D, plain, GeGLU) against the stock
DeepSpeed MoE layer running the family's own FFN modules one by one: same outputs and gradients, the stock
state-dict names; FFNs with dropout stay on the loop and the run says so."""

import copy

import pytest
import torch
from deepspeed.moe.layer import MoE
from transformers import AutoConfig, AutoModelForCausalLM

from moe_models.models.architectures import architecture_of
from moe_models.models.probe import small_config
from moe_models.moe import experts as experts_module
from moe_models.moe.experts import ExpertLoop, GroupedFFNExperts, StackedExperts
from moe_models.moe.layer import GroupedMoE

DIM = 64  # small_config's hidden size


def family_ffn(model_type, **overrides):
    config = small_config(AutoConfig.for_model(model_type))
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    arch = architecture_of(model)
    return getattr(arch.blocks_of(model)[0], arch.ffn), arch.ffn_projections


def layers(model_type, **overrides):
    ffn, projections = family_ffn(model_type, **overrides)
    args = dict(expert=ffn, num_experts=4, k=2, top2_2nd_expert_sampling=False, use_rts=False, drop_tokens=False)
    stock = MoE(DIM, **args)
    grouped = GroupedMoE(DIM, ffn_projections=projections, **{**args, "expert": copy.deepcopy(ffn)})
    torch.manual_seed(1)
    with torch.no_grad():  # every expert different, biases too
        for param in stock.parameters():
            param.normal_(0, 0.2)
    grouped.load_state_dict(stock.state_dict())
    return stock, grouped


def run(layer, x):
    x = x.clone().requires_grad_(True)
    out, l_aux, _ = layer(x)
    ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + l_aux).backward()
    return out, x.grad


@pytest.mark.parametrize("model_type, holder", [
    ("phi3", GroupedFFNExperts),        # fused gate_up, SwiGLU
    ("gpt_neox", GroupedFFNExperts),    # plain, GELU, biases
    ("starcoder2", GroupedFFNExperts),  # plain, gelu_tanh, biases
    ("gpt2", GroupedFFNExperts),        # Conv1D, biases (no dropout: resid_pdrop 0 below)
    ("gemma", StackedExperts),          # GeGLU-tanh: DeepSpeed's geglu_tanh
    ("nemotron", GroupedFFNExperts),    # plain, relu^2, no biases
])
def test_grouped_forms_compute_the_families_own_ffns(model_type, holder):
    stock, grouped = layers(model_type, **({"resid_pdrop": 0.0} if model_type == "gpt2" else {}))
    assert isinstance(grouped.deepspeed_moe.experts, holder)
    assert grouped.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(3, 10, DIM, generator=torch.Generator().manual_seed(0))
    (out, x_grad), (want, want_x_grad) = run(grouped, x), run(stock, x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_grad, want_x_grad, rtol=1e-4, atol=1e-5)
    grads = {}  # the grouped experts' gradients, per expert, under the stock state-dict names
    experts = grouped.deepspeed_moe.experts
    for i in range(experts.num_experts):
        for name, grad in experts.expert_weights(i, of=lambda p: p.grad).items():
            grads[f"deepspeed_moe.experts.deepspeed_experts.{i}.{name}"] = grad
    stock_grads = {name: p.grad for name, p in stock.named_parameters() if ".deepspeed_experts." in name}
    assert grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_an_ffn_with_dropout_stays_on_the_loop_and_says_so_once(capsys, monkeypatch):
    monkeypatch.setattr(experts_module, "_ANNOUNCED", set())
    for _ in range(2):
        _, grouped = layers("gpt_bigcode", resid_pdrop=0.1)
        assert isinstance(grouped.deepspeed_moe.experts, ExpertLoop)
    said = capsys.readouterr().out
    assert said.count("run one after the other") == 1 and "dropout (p=0.1)" in said
