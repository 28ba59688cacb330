"""--moe_impl grouped against the stock DeepSpeed MoE layer: same outputs, balance loss, counts and gradients."""

import copy
import json

import pytest
import torch
from deepspeed.moe.layer import MoE
from helpers import tiny_model

import train
from moe_models import MoEConfig, convert_to_moe, moe_layers_of
from moe_models.models.architectures import SWIGLU_FFN_PROJECTIONS
from moe_models.moe.experts import StackedExperts
from moe_models.moe.layer import GroupedMoE, MoEFeedForward

DIM, FFN = 64, 96


def swiglu_ffn():
    return tiny_model(hidden_size=DIM, intermediate_size=FFN).model.layers[0].mlp


def layer_pair(top_k, num_experts=8, expert=None, **kwargs):
    """A stock and a grouped layer with the same weights (random experts, so they differ)."""
    expert = expert or swiglu_ffn()
    args = {"expert": expert, "num_experts": num_experts, "k": top_k, "top2_2nd_expert_sampling": False,
            "use_rts": False, **kwargs}
    stock = MoE(DIM, **args)
    args["expert"] = copy.deepcopy(expert)  # use_residual keeps the module itself: one each
    grouped = GroupedMoE(DIM, ffn_projections=SWIGLU_FFN_PROJECTIONS, **args)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in stock.parameters():
            param.normal_(0, 0.3)
    grouped.load_state_dict(stock.state_dict())
    return stock, grouped


def run(layer, x, seed=0):
    torch.manual_seed(seed)  # the same noise draws for both layers where the gate is noisy
    x = x.clone().requires_grad_(True)
    out, l_aux, counts = layer(x)
    ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + l_aux).backward()
    return out, l_aux, counts, x.grad, grads_by_state_name(layer)


def grads_by_state_name(layer):
    """Gradients under the state-dict names, stacked experts' split per expert like their weights."""
    experts = layer.deepspeed_moe.experts
    grads = {name: p.grad for name, p in layer.named_parameters() if not name.startswith("deepspeed_moe.experts.")}
    if isinstance(experts, StackedExperts):
        for i in range(experts.num_experts):
            for name, grad in experts.expert_weights(i, of=lambda p: p.grad).items():
                grads[f"deepspeed_moe.experts.deepspeed_experts.{i}.{name}"] = grad
    else:
        grads.update({f"deepspeed_moe.experts.{name}": p.grad for name, p in experts.named_parameters()})
    return grads


def assert_same(stock, grouped, x):
    got, want = run(grouped, x), run(stock, x)
    for name, a, b in zip(("output", "l_aux", "exp_counts", "input grad"), got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} differs")
    assert got[4].keys() == want[4].keys()
    for name in want[4]:  # fp32 sums in another order: absolute tolerance relative to the gradient's scale
        scale = max(1.0, want[4][name].abs().max().item())
        torch.testing.assert_close(got[4][name], want[4][name], rtol=1e-4, atol=1e-6 * scale,
                                   msg=f"grad of {name} differs")
    assert all(g.abs().sum() > 0 for name, g in got[4].items())


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_dropless_equals_stock(top_k):
    stock, grouped = layer_pair(top_k, drop_tokens=False)
    assert_same(stock, grouped, torch.randn(2, 40, DIM))


def test_residual_moe_equals_stock():
    stock, grouped = layer_pair(2, drop_tokens=False, use_residual=True)
    assert_same(stock, grouped, torch.randn(2, 40, DIM))


@pytest.mark.parametrize("top_k, noise", [(2, dict(top2_2nd_expert_sampling=True)),
                                          (1, dict(noisy_gate_policy="RSample")),
                                          (2, dict(noisy_gate_policy="Jitter"))])
def test_noisy_gates_draw_like_stock(top_k, noise):
    stock, grouped = layer_pair(top_k, drop_tokens=False, **noise)
    assert_same(stock, grouped, torch.randn(2, 40, DIM))


# (top_k, layer settings, whether routes are dropped): 80 tokens, over 8 experts unless said
CAPACITY_CASES = {
    "top1": (1, dict(capacity_factor=0.5), True),
    "top1-rts": (1, dict(capacity_factor=0.5, use_rts=True), True),
    "top1-rsample-rts": (1, dict(capacity_factor=0.5, use_rts=True, noisy_gate_policy="RSample"), True),
    # 80 / 6 x 1.05 = 14 exactly: 14 in fp32 (DeepSpeed's tensors), 15 in float64
    "top1-fp32-capacity": (1, dict(num_experts=6, capacity_factor=1.05), True),
    "top2": (2, dict(capacity_factor=0.5), True),
    "top2-sampled-second": (2, dict(capacity_factor=0.5, top2_2nd_expert_sampling=True), True),
    "top2-fp32-capacity": (2, dict(num_experts=6, capacity_factor=1.05), True),  # 28 in fp32, 29 in float64
    "top2-no-drop": (2, dict(capacity_factor=4.0), False),
    "top3": (3, dict(capacity_factor=0.5), True),
    "top4-min-capacity": (4, dict(capacity_factor=0.25, min_capacity=16), True),  # 10 x 0.25 x 4 = 10 < 16
    "top4-no-drop": (4, dict(capacity_factor=2.0), False),
    "top2-jitter": (2, dict(capacity_factor=0.5, noisy_gate_policy="Jitter"), True),
}


@pytest.mark.parametrize("case", CAPACITY_CASES)
def test_capacity_mode_drops_like_stock(case):
    top_k, settings, drops = CAPACITY_CASES[case]
    stock, grouped = layer_pair(top_k, drop_tokens=True, **{"min_capacity": 1, **settings})
    x = torch.randn(2, 40, DIM)
    torch.manual_seed(0)
    routed = stock.deepspeed_moe.gate(x.reshape(-1, DIM), None, True)[3]
    assert (routed < 0).any() == drops, "the case wants some dropped routes" if drops else "no dropped route"
    assert_same(stock, grouped, x)


def test_other_ffns_run_expert_by_expert_and_equal_stock():
    gpt2_mlp = tiny_model("tiny-gpt2", n_embd=DIM, n_inner=FFN).transformer.h[0].mlp
    for drop_tokens in (False, True):
        stock, grouped = layer_pair(2, expert=gpt2_mlp, drop_tokens=drop_tokens, capacity_factor=0.5)
        assert not isinstance(grouped.deepspeed_moe.experts, StackedExperts)
        assert_same(stock, grouped, torch.randn(2, 40, DIM))


def test_eval_mode_and_bf16_run():
    stock, grouped = layer_pair(2, drop_tokens=False)
    x = torch.randn(2, 40, DIM)
    with torch.no_grad():
        torch.testing.assert_close(grouped.eval()(x)[0], stock.eval()(x)[0], rtol=1e-5, atol=1e-5)
        out = grouped.to(torch.bfloat16)(x.to(torch.bfloat16))[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("drop_tokens", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_no_host_sync_in_forward_and_backward_on_gpu(top_k, drop_tokens):
    _, grouped = layer_pair(top_k, drop_tokens=drop_tokens, top2_2nd_expert_sampling=True, use_rts=True,
                            capacity_factor=0.5)
    grouped = grouped.cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, DIM, device="cuda", dtype=torch.bfloat16)
    run(grouped, x)  # first call: lazy initialisation may sync
    x.requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, l_aux, _ = grouped(x)
        (out.float().sum() + l_aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_same_module_type_state_dict_names_and_expert_flags():
    stock, grouped = layer_pair(2)
    assert isinstance(grouped, MoE)
    assert isinstance(grouped.deepspeed_moe.experts, StackedExperts)
    assert list(grouped.state_dict()) == list(stock.state_dict())
    for layer in (stock, grouped):
        flags = {(name.startswith("deepspeed_moe.experts."), getattr(p, "allreduce", True), getattr(p, "group_name", None))
                 for name, p in layer.named_parameters()}
        assert flags == {(True, False, "ep_size_1"), (False, True, None)}, flags


def test_stacked_experts_take_the_stock_state_dict_and_refuse_a_missing_expert():
    stock, grouped = layer_pair(2)
    state = stock.state_dict()
    key = "deepspeed_moe.experts.deepspeed_experts.3.up_proj.weight"
    assert torch.equal(grouped.deepspeed_moe.experts.w3[3], state[key])  # layer_pair loaded it
    del state[key]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"deepspeed_moe.experts.w3\""):
        grouped.load_state_dict(state)


def test_model_with_grouped_impl_equals_stock_model():
    cfg = dict(num_experts=4, top_k=2, drop_tokens=False, top2_2nd_expert_sampling=False, expert_init="random")
    stock = convert_to_moe(tiny_model(), MoEConfig(moe_impl="deepspeed", **cfg))
    grouped = convert_to_moe(tiny_model(), MoEConfig(moe_impl="grouped", **cfg))
    assert all(isinstance(layer.moe, GroupedMoE) for layer in moe_layers_of(grouped))
    assert all(isinstance(layer, MoEFeedForward) for layer in moe_layers_of(grouped))
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grouped(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)


def losses(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


RUN_FLAGS = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--eval_steps", "0",
             "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--per_device_train_batch_size", "2",
             "--drop_tokens", "false", "--top2_2nd_expert_sampling", "false", "--logging_steps", "1",
             "--max_steps", "4", "--save_steps", "2"]


@pytest.mark.parametrize("saved_by, resumed_by", [("deepspeed", "grouped"), ("grouped", "deepspeed")])
def test_checkpoint_loads_into_the_other_implementation(saved_by, resumed_by, tmp_path, world, capsys):
    """The other implementation refuses the optimizer state (ordered by the old layout) and says what to do; with
    --reset_optimizer it continues exactly as the saving implementation does from the same checkpoint."""
    saved = tmp_path / "saved"
    train.main([*RUN_FLAGS, "--moe_impl", saved_by, "--output_dir", str(saved)])
    resume = ["--resume_from_checkpoint", str(saved / "checkpoints" / "global_step2")]
    with pytest.raises(SystemExit):
        train.main([*RUN_FLAGS, "--moe_impl", resumed_by, "--output_dir", str(tmp_path / "refused"), *resume])
    assert f"--moe_impl {saved_by}, this run has 1 ranks, ep_size 1 and --moe_impl {resumed_by}" in capsys.readouterr().err
    for impl in (saved_by, resumed_by):
        train.main([*RUN_FLAGS, "--moe_impl", impl, "--output_dir", str(tmp_path / impl), *resume, "--reset_optimizer"])
    assert len(losses(tmp_path / resumed_by)) == 2
    assert losses(tmp_path / resumed_by) == pytest.approx(losses(tmp_path / saved_by), rel=1e-5)


def test_a_checkpoint_without_moe_impl_counts_as_the_stock_layout(tmp_path, world, capsys):
    """Checkpoints written before complete.json recorded moe_impl held every expert apart (the stock order)."""
    saved = tmp_path / "saved"
    train.main([*RUN_FLAGS, "--moe_impl", "deepspeed", "--output_dir", str(saved)])
    complete = saved / "checkpoints" / "global_step2" / "complete.json"
    meta = json.loads(complete.read_text())
    del meta["moe_impl"]
    complete.write_text(json.dumps(meta))
    resume = ["--resume_from_checkpoint", str(complete.parent)]
    with pytest.raises(SystemExit):
        train.main([*RUN_FLAGS, "--moe_impl", "grouped", "--output_dir", str(tmp_path / "refused"), *resume])
    assert "--moe_impl deepspeed, this run has" in capsys.readouterr().err
    train.main([*RUN_FLAGS, "--moe_impl", "deepspeed", "--output_dir", str(tmp_path / "resumed"), *resume])
    assert len(losses(tmp_path / "resumed")) == 2
