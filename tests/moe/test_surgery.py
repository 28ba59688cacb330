"""convert_to_moe on every supported family: structure, patterns, initialisation, function preservation."""

import pytest
import torch
from deepspeed.moe.layer import MoE

from helpers import tiny_model
from moe_models import ConfigError, MoEConfig, convert_to_moe, moe_layers_of
from moe_models.models.architectures import ARCHITECTURES, architecture_of
from moe_models.run.moe_layout import resolve_moe_layers
from moe_models.models.source import PRESETS

FAMILIES = sorted(PRESETS)


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", FAMILIES)
def test_every_family_converts_trains_and_routes(preset):
    model = convert_to_moe(tiny_model(preset).train(), MoEConfig(num_experts=4, top_k=2))
    blocks = architecture_of(model).blocks_of(model)
    assert sum(isinstance(m, MoE) for m in model.modules()) == len(blocks) == 4
    for layer in moe_layers_of(model):
        assert layer.num_experts == 4 and len(layer.local_expert_weights()) == 4
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for layer in moe_layers_of(model):
        assert layer.router.wg.weight.grad is not None and layer.router.wg.weight.grad.abs().sum() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts.parameters())


def test_architecture_table_covers_the_presets_and_inspection_finds_the_same():
    assert {PRESETS[p]["model_type"] for p in PRESETS} <= set(ARCHITECTURES)
    for preset in FAMILIES:
        model = tiny_model(preset)
        listed = ARCHITECTURES[model.config.model_type]
        model.config.model_type = "not-a-family"  # not in the table: found by inspecting the blocks
        found = architecture_of(model)
        assert found.discovered and (found.blocks, found.ffn) == (listed.blocks, listed.ffn)
        assert found.ffn_projections == listed.ffn_projections


@pytest.mark.parametrize("spec, expected", [("all", [0, 1, 2, 3]), ("every:2", [1, 3]), ("every:1", [0, 1, 2, 3]),
                                            ("0,2", [0, 2]), ([3, 1], [1, 3]), ("every:4", [3])])
def test_moe_layers_patterns(spec, expected):
    assert resolve_moe_layers(spec, 4) == expected
    model = convert_to_moe(tiny_model(), MoEConfig(num_experts=2, moe_layers=spec))
    blocks = architecture_of(model).blocks_of(model)
    converted = [i for i, b in enumerate(blocks) if isinstance(b.mlp, torch.nn.Module) and moe_layers_of(b)]
    assert converted == expected


@pytest.mark.parametrize("spec, message", [("5", r"names blocks \[5\], but the model has blocks 0..3"), ("every:x", "must be an integer"),
                                           ("every:0", "must be >= 1"), ("odd", "is not 'all'"), ("1,1", "twice")])
def test_bad_moe_layers_say_what_is_wrong(spec, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        convert_to_moe(tiny_model(), MoEConfig(num_experts=2, moe_layers=spec))


def test_pyramid_expert_counts():
    model = convert_to_moe(tiny_model(), MoEConfig(num_experts=[2, 4, 4, 8], top_k=2))
    assert [layer.num_experts for layer in moe_layers_of(model)] == [2, 4, 4, 8]
    assert [len(layer.local_expert_weights()) for layer in moe_layers_of(model)] == [2, 4, 4, 8]
    with pytest.raises(ConfigError, match="num_experts lists 3 counts but moe_layers selects 4 blocks"):
        convert_to_moe(tiny_model(), MoEConfig(num_experts=[2, 4, 8]))


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("top_k", [2, 3])
def test_copy_init_preserves_the_dense_function(preset, top_k):
    dense = tiny_model(preset)
    ids = tokens()
    with torch.no_grad():
        expected = dense(ids).logits
        moe = convert_to_moe(dense, MoEConfig(num_experts=4, top_k=top_k, drop_tokens=False, expert_init="copy"))
        got = moe(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_top1_cannot_preserve_the_function():
    """Documented limit: top-1 scales the expert output by the router probability (< 1)."""
    dense = tiny_model()
    ids = tokens()
    with torch.no_grad():
        expected = dense(ids).logits
        got = convert_to_moe(dense, MoEConfig(num_experts=4, top_k=1, drop_tokens=False))(ids).logits
    assert (got - expected).abs().max() > 1e-3


def test_expert_init_modes():
    dense_ffn = tiny_model().model.layers[0].mlp
    reference = {n: p.clone() for n, p in dense_ffn.named_parameters()}

    def experts(init, seed=0):
        model = convert_to_moe(tiny_model(), MoEConfig(num_experts=3, expert_init=init), seed=seed)
        return moe_layers_of(model)[0].local_expert_weights()

    for expert in experts("copy"):
        for n, p in expert.items():
            assert torch.equal(p, reference[n])
    noisy = experts("copy_noise")
    for expert in noisy:
        for n, p in expert.items():
            diff = (p - reference[n]).std() / reference[n].std()
            assert 0.002 < diff < 0.05  # expert_noise_std = 0.01 of each weight's std
    assert not torch.equal(noisy[0]["up_proj.weight"], noisy[1]["up_proj.weight"])
    fresh = experts("random")
    assert not torch.allclose(fresh[0]["up_proj.weight"], reference["up_proj.weight"])
    assert fresh[0]["up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    # same seed -> same experts; another seed -> other experts
    assert torch.equal(experts("random")[2]["down_proj.weight"], fresh[2]["down_proj.weight"])
    assert not torch.equal(experts("random", seed=1)[2]["down_proj.weight"], fresh[2]["down_proj.weight"])


def test_router_starts_fresh_and_seeded():
    a = moe_layers_of(convert_to_moe(tiny_model(seed=0), MoEConfig(num_experts=4), seed=7))
    b = moe_layers_of(convert_to_moe(tiny_model(seed=1), MoEConfig(num_experts=4), seed=7))
    assert torch.equal(a[0].router.wg.weight, b[0].router.wg.weight)  # independent of the global RNG
    assert not torch.equal(a[0].router.wg.weight, a[1].router.wg.weight)  # one draw per block
    assert a[0].router.wg.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_residual_moe_keeps_the_dense_ffn():
    model = convert_to_moe(tiny_model().train(), MoEConfig(num_experts=2, use_residual=True))
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    layer = moe_layers_of(model)[0]
    assert layer.moe.use_residual and layer.moe.mlp.up_proj.weight.grad is not None


def test_balance_loss_reaches_the_router_only():
    from moe_models import balance_loss
    model = convert_to_moe(tiny_model().train(), MoEConfig(num_experts=4, top_k=2))
    model(tokens())
    aux = balance_loss(moe_layers_of(model))
    assert aux.requires_grad and aux.item() > 0
    aux.backward()
    last = moe_layers_of(model)[-1]  # its balance loss depends on its router, not on its experts
    assert last.router.wg.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in last.experts.parameters())


def test_bad_moe_settings_are_reported_together():
    with pytest.raises(ConfigError) as err:
        convert_to_moe(tiny_model(), MoEConfig(num_experts=6, ep_size=4, top_k=8, capacity_factor=0))
    text = str(err.value)
    assert "num_experts (6) must be divisible by ep_size (4)" in text
    assert "top_k (8) must be <= num_experts (6)" in text
    assert "capacity_factor (0) must be > 0" in text
