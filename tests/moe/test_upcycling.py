"""--expert_init granular (fine-grained experts, He et al. 2024) and drop (Drop-Upcycling, Nakamura et al. 2025):
the experts against the dense FFN's weights sliced or compared here, granular's step-0 function against the dense
model's logits, the settings checks, and an exact resume of a run with each."""

import json

import pytest
import torch

import train
from helpers import tiny_model
from moe_models import ConfigError, MoEConfig, convert_to_moe, moe_layers_of
from moe_models.moe.experts import ExpertLoop, StackedExperts
from moe_models.moe.checks import moe_problems
from moe_models.models.source import PRESETS

FAMILIES = sorted(PRESETS)
# exact step 0: dropless, deterministic top-2
EXACT = dict(drop_tokens=False, top2_2nd_expert_sampling=False)


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


def granular(num_experts, granularity, top_k, **kw) -> MoEConfig:
    return MoEConfig(num_experts=num_experts, top_k=top_k, expert_init="granular", granularity=granularity, **kw)


def dense_ffn_weights(model) -> dict[str, torch.Tensor]:
    """Block 0's FFN weights, read before the conversion takes the FFN out of the model."""
    return {name: p.detach().clone() for name, p in model.get_submodule(ffn_path(model)).named_parameters()}


def ffn_path(model) -> str:
    return "transformer.h.0.mlp" if model.config.model_type == "gpt2" else "model.layers.0.mlp"


# Granular upcycling: the function at step 0 ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("num_experts, granularity, top_k", [(4, 2, 2), (8, 4, 4), (8, 2, 4)])
def test_granular_upcycling_computes_the_dense_function(preset, num_experts, granularity, top_k):
    """top_k a multiple of G, the grouped router init, no drops: the dense model's logits (fp32)."""
    dense, ids = tiny_model(preset), tokens()
    with torch.no_grad():
        expected = dense(ids).logits
        got = convert_to_moe(dense, granular(num_experts, granularity, top_k, **EXACT))(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("shared, gate", [(2, False), (4, True)])
def test_granular_experts_with_shared_experts_compute_the_dense_function(preset, shared, gate):
    """Shared experts as wide as the routed ones (F/G each): N/G whole copies of the dense FFN, scaled with the
    routed experts so that the layer still computes the dense FFN (granular's xG and the shared 1/(copies + 1))."""
    dense, ids = tiny_model(preset), tokens()
    dense_matrices = sum(w.numel() for w in dense_ffn_weights(dense).values() if w.dim() == 2)
    with torch.no_grad():
        expected = dense(ids).logits
        moe = convert_to_moe(dense, granular(4, 2, 2, num_shared_experts=shared, shared_expert_gate=gate, **EXACT))
        got = moe(ids).logits
    shared_matrices = sum(w.numel() for w in moe_layers_of(moe)[0].shared_experts.parameters() if w.dim() == 2)
    assert shared_matrices == (shared // 2) * dense_matrices
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_granular_shared_experts_must_be_whole_copies():
    assert any("num_shared_experts (3) must be a multiple of granularity (2)" in p
               for p in moe_problems(granular(4, 2, 2, num_shared_experts=3)))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_granular_upcycling_on_the_stock_deepspeed_layer_too(preset):
    dense, ids = tiny_model(preset), tokens()
    with torch.no_grad():
        expected = dense(ids).logits
        got = convert_to_moe(dense, granular(8, 4, 4, moe_impl="deepspeed", **EXACT))(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_without_the_output_scaling_or_with_top_k_below_g_the_function_changes(preset):
    """The documented limits: the x G on the output projection is what makes step 0 exact, and top_k 2 with G = 4
    covers only half of a group's slices."""
    ids = tokens()
    with torch.no_grad():
        expected = tiny_model(preset)(ids).logits
        unscaled = convert_to_moe(tiny_model(preset), granular(4, 4, 4, **EXACT))
        for layer in moe_layers_of(unscaled):
            for weights in layer.local_expert_weights():
                output = "c_proj.weight" if preset == "tiny-gpt2" else "down_proj.weight"
                weights[output].div_(4)
        assert (unscaled(ids).logits - expected).abs().max() > 1e-2
        partial = convert_to_moe(tiny_model(preset), granular(8, 4, 2, **EXACT))
        assert (partial(ids).logits - expected).abs().max() > 1e-2


# Granular upcycling: the experts and the router ------------------------------------------------------------------

def test_granular_llama_experts_are_slices_of_the_dense_ffn_with_down_times_g():
    model = tiny_model()
    dense = dense_ffn_weights(model)
    layer = moe_layers_of(convert_to_moe(model, granular(8, 4, 4)))[0]
    width = 256 // 4
    for e, weights in enumerate(layer.local_expert_weights()):
        units = slice((e % 4) * width, (e % 4 + 1) * width)
        assert torch.equal(weights["gate_proj.weight"], dense["gate_proj.weight"][units])
        assert torch.equal(weights["up_proj.weight"], dense["up_proj.weight"][units])
        assert torch.equal(weights["down_proj.weight"], dense["down_proj.weight"][:, units] * 4)


def test_granular_gpt2_experts_slice_conv1d_columns_and_rows_and_keep_the_output_bias():
    model = tiny_model("tiny-gpt2")
    with torch.no_grad():  # non-zero biases, so that the test sees where they go
        for name in ("c_fc.bias", "c_proj.bias"):
            model.transformer.h[0].mlp.get_parameter(name).normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    dense = dense_ffn_weights(model)
    layer = moe_layers_of(convert_to_moe(model, granular(4, 2, 2)))[0]
    width = dense["c_fc.bias"].numel() // 2
    for e, weights in enumerate(layer.local_expert_weights()):
        units = slice((e % 2) * width, (e % 2 + 1) * width)
        assert weights["c_fc.weight"].shape == (128, width)
        assert torch.equal(weights["c_fc.weight"], dense["c_fc.weight"][:, units])
        assert torch.equal(weights["c_fc.bias"], dense["c_fc.bias"][units])
        assert torch.equal(weights["c_proj.weight"], dense["c_proj.weight"][units] * 2)
        assert torch.equal(weights["c_proj.bias"], dense["c_proj.bias"])


def test_granular_router_gives_each_group_of_g_experts_one_row():
    layers = moe_layers_of(convert_to_moe(tiny_model(), granular(8, 4, 4), seed=7))
    router_ED = layers[0].router.wg.weight
    groups = router_ED.reshape(2, 4, -1)
    assert torch.equal(groups, groups[:, :1].expand_as(groups))  # equal rows within a group
    assert not torch.equal(groups[0, 0], groups[1, 0])
    assert not torch.equal(router_ED, layers[1].router.wg.weight)
    assert router_ED.std().item() == pytest.approx(0.02, rel=0.2)
    # G = 1 draws the same router as the other inits
    assert torch.equal(moe_layers_of(convert_to_moe(tiny_model(), granular(8, 1, 2), seed=7))[0].router.wg.weight,
                       moe_layers_of(convert_to_moe(tiny_model(), MoEConfig(num_experts=8), seed=7))[0].router.wg.weight)


@pytest.mark.parametrize("granularity, holder", [(4, StackedExperts), (8, ExpertLoop)])
def test_granular_experts_run_as_grouped_gemms_when_aligned(granularity, holder):
    """F = 96: F/4 = 24 rows are 16-byte aligned (grouped GEMMs), F/8 = 12 are not (one expert after the other);
    either way the stock per-expert state-dict names, F/G wide, and the dense function."""
    dense, ids = tiny_model(intermediate_size=96), tokens()
    with torch.no_grad():
        expected = dense(ids).logits
        model = convert_to_moe(dense, granular(8, granularity, 8, **EXACT))
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    layer = moe_layers_of(model)[0]
    assert isinstance(layer.experts, holder)
    state = layer.state_dict()
    assert state["moe.deepspeed_moe.experts.deepspeed_experts.7.gate_proj.weight"].shape == (96 // granularity, 128)
    assert state["moe.deepspeed_moe.experts.deepspeed_experts.7.down_proj.weight"].shape == (128, 96 // granularity)


def test_granular_with_a_residual_ffn_keeps_the_dense_function_and_trains():
    """The residual FFN is the whole dense FFN (not an F/G slice), so the learned mix of two dense functions is one."""
    dense, ids = tiny_model(), tokens()
    up_FD = dense.model.layers[0].mlp.up_proj.weight.detach().clone()
    with torch.no_grad():
        expected = dense(ids).logits
        model = convert_to_moe(dense, granular(4, 2, 2, use_residual=True, **EXACT))
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.train()(input_ids=ids, labels=ids).loss.backward()
    layer = moe_layers_of(model)[0]
    assert torch.equal(layer.moe.mlp.up_proj.weight, up_FD) and layer.moe.mlp.up_proj.weight.grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts.parameters())


# Drop-Upcycling ---------------------------------------------------------------------------------------------------

def redrawn_units(dense: dict, weights: dict, inputs: list[tuple[str, int]], output: tuple[str, int]) -> list[set]:
    """The hidden units whose weights differ from the dense FFN's, per parameter ((name, unit dimension) pairs)."""
    def changed(name, dim):
        differs = (weights[name] != dense[name])
        other = [d for d in range(differs.dim()) if d != dim]
        return set(torch.nonzero(differs.any(dim=other[0]) if other else differs).flatten().tolist())
    return [changed(name, dim) for name, dim in [*inputs, output]]


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_drop_upcycling_redraws_a_fraction_of_each_experts_units(ratio):
    model = tiny_model()
    dense = dense_ffn_weights(model)
    experts = moe_layers_of(convert_to_moe(model, MoEConfig(num_experts=4, expert_init="drop", reinit_ratio=ratio)))
    F = 256
    chosen = []
    for weights in experts[0].local_expert_weights():
        gate, up, down = redrawn_units(dense, weights, [("gate_proj.weight", 0), ("up_proj.weight", 0)],
                                       ("down_proj.weight", 1))
        assert gate == up == down and len(gate) == round(ratio * F)  # the same units in all three matrices
        kept = sorted(set(range(F)) - gate)
        assert torch.equal(weights["gate_proj.weight"][kept], dense["gate_proj.weight"][kept])  # exact copies
        assert torch.equal(weights["down_proj.weight"][:, kept], dense["down_proj.weight"][:, kept])
        for name, dim in [("gate_proj.weight", 0), ("up_proj.weight", 0), ("down_proj.weight", 1)]:
            fresh = weights[name].index_select(dim, torch.tensor(sorted(gate)))
            assert fresh.mean().item() == pytest.approx(dense[name].mean().item(), abs=0.05 * dense[name].std().item())
            assert fresh.std().item() == pytest.approx(dense[name].std().item(), rel=0.05)
        chosen.append(gate)
    assert len({frozenset(units) for units in chosen}) == 4  # each expert its own units


def test_drop_upcycling_of_gpt2_moves_columns_bias_and_rows_together():
    model = tiny_model("tiny-gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias.normal_(0.1, 0.05, generator=torch.Generator().manual_seed(1))
    dense = dense_ffn_weights(model)
    layer = moe_layers_of(convert_to_moe(model, MoEConfig(num_experts=2, expert_init="drop")))[0]
    F = dense["c_fc.bias"].numel()
    for weights in layer.local_expert_weights():
        columns, bias, rows = redrawn_units(dense, weights, [("c_fc.weight", 1), ("c_fc.bias", 0)],
                                            ("c_proj.weight", 0))
        assert columns == bias == rows and len(rows) == F // 2
        assert torch.equal(weights["c_proj.bias"], dense["c_proj.bias"])  # belongs to no hidden unit


def test_drop_upcycling_ends_are_copies_and_fresh_experts():
    def experts(ratio):
        model = tiny_model()
        dense = dense_ffn_weights(model)
        layer = moe_layers_of(convert_to_moe(model, MoEConfig(num_experts=2, expert_init="drop", reinit_ratio=ratio)))
        return dense, layer[0].local_expert_weights()

    dense, copies = experts(0.0)
    assert all(torch.equal(w[name], dense[name]) for w in copies for name in dense)
    dense, fresh = experts(1.0)
    assert all((w["up_proj.weight"] != dense["up_proj.weight"]).all(dim=1).all() for w in fresh)


def test_drop_upcycling_is_seeded_by_block_and_expert():
    def up(seed):
        cfg = MoEConfig(num_experts=4, expert_init="drop")
        return [[w["up_proj.weight"] for w in layer.local_expert_weights()]
                for layer in moe_layers_of(convert_to_moe(tiny_model(), cfg, seed=seed))]
    a, b, c = up(0), up(0), up(1)
    assert all(torch.equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    assert not torch.equal(a[0][1], c[0][1])
    assert not torch.equal(a[0][1], a[1][1]) and not torch.equal(a[0][1], a[0][2])


# Settings -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, message", [
    (granular(4, 0, 2), "granularity (0) must be >= 1"),
    (MoEConfig(expert_init="drop", reinit_ratio=1.5), "reinit_ratio (1.5) must be in [0, 1]"),
    (MoEConfig(granularity=2), "granularity (2) is only used by --expert_init granular (this run has --expert_init "
                               "copy): add --expert_init granular or drop --granularity"),
    (MoEConfig(reinit_ratio=0.3), "reinit_ratio (0.3) is only used by --expert_init drop"),
    (granular(6, 4, 2), "num_experts (6) must be a multiple of granularity (4) for --expert_init granular"),
])
def test_bad_settings_say_how_to_fix_them(cfg, message):
    assert any(message in problem for problem in moe_problems(cfg)), moe_problems(cfg)


def test_a_granularity_that_does_not_divide_the_ffn_is_refused():
    with pytest.raises(ConfigError, match=r"granularity \(5\) must divide the FFN's 96 hidden units \(block 0\) for "
                                          r"--expert_init granular: pick a divisor of 96, such as 2, 3, 4, 6, 8, 12"):
        convert_to_moe(tiny_model(intermediate_size=96), granular(5, 5, 2))
    with pytest.raises(ConfigError, match="granularity .512. must divide the FFN's 256 hidden units"):
        convert_to_moe(tiny_model(), granular(512, 512, 2))


# A run: exact resume ------------------------------------------------------------------------------------------------

FLAGS = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--eval_steps", "0",
         "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--per_device_train_batch_size", "2",
         "--logging_steps", "1", "--top2_2nd_expert_sampling", "false"]
INITS = {"granular": ["--expert_init", "granular", "--granularity", "2"],
         "drop": ["--expert_init", "drop", "--reinit_ratio", "0.25"]}


def losses(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("init", INITS)
def test_a_run_resumes_exactly(init, world, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main([*FLAGS, *INITS[init], "--max_steps", "4", "--save_steps", "2", "--output_dir", str(full)])
    train.main([*FLAGS, *INITS[init], "--max_steps", "4", "--output_dir", str(resumed),
                "--resume_from_checkpoint", str(full / "checkpoints" / "global_step2")])
    assert len(losses(full)) == 4
    assert losses(resumed) == pytest.approx(losses(full)[2:], rel=1e-6)
