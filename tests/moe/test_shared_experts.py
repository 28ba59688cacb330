"""Shared experts (--num_shared_experts, --shared_expert_gate): the upcycled model against the dense model, the
layer's output against its formula written out here, initialisation, metrics, settings, the engine's groups and an
exact resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

import train
from moe_models import ConfigError, MoEConfig, convert_to_moe, moe_layers_of
from moe_models.metrics.throughput import active_parameters
from moe_models.models.architectures import ARCHITECTURES
from moe_models.moe.checks import moe_problems
from moe_models.moe.layer import MoEFeedForward
from moe_models.moe.shared import widened_ffn
from moe_models.moe.model_layers import MoELayers
from moe_models.run.cli import parse_args

DIM, WIDTH = 64, 96


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])  # GPT-2: Conv1D with biases
@pytest.mark.parametrize("num_shared, gate", [(1, False), (3, False), (2, True)])
@pytest.mark.parametrize("moe_impl", ["grouped", "deepspeed"])
@torch.no_grad()
def test_upcycled_model_computes_the_dense_model(preset, num_shared, gate, moe_impl):
    dense = tiny_model(preset)
    ids = tokens()
    expected = dense(ids).logits
    moe = convert_to_moe(dense, MoEConfig(num_experts=4, top_k=2, drop_tokens=False, num_shared_experts=num_shared,
                                          shared_expert_gate=gate, moe_impl=moe_impl))
    layer = moe_layers_of(moe)[0]
    assert layer.shared_experts(torch.randn(3, 128)).abs().sum() > 0  # both parts contribute
    torch.testing.assert_close(moe(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@torch.no_grad()
def test_the_widened_ffn_is_the_sum_of_copies_of_the_dense_ffn(preset):
    dense = tiny_model(preset)
    arch = ARCHITECTURES[dense.config.model_type]
    ffn = arch.blocks_of(dense)[0].mlp
    wide = widened_ffn(ffn, arch.ffn_projections, 3)
    assert type(wide) is type(ffn)
    output_bias = getattr(getattr(ffn, arch.ffn_projections[1]), "bias", None)
    bias = output_bias if output_bias is not None else 0.0
    x = torch.randn(2, 5, 128)
    torch.testing.assert_close(wide(x), 3 * (ffn(x) - bias) + bias, rtol=1e-5, atol=1e-5)  # one output bias
    widths = {name: tuple(p.shape) for name, p in wide.named_parameters()}
    if preset == "tiny-llama":
        assert widths == {"gate_proj.weight": (768, 128), "up_proj.weight": (768, 128), "down_proj.weight": (128, 768)}
        assert wide.intermediate_size == 768


def layer(num_shared=2, gate=True, moe_impl="grouped") -> MoEFeedForward:
    ffn = tiny_model(hidden_size=DIM, intermediate_size=WIDTH).model.layers[0].mlp
    cfg = MoEConfig(num_experts=4, top_k=2, moe_impl=moe_impl, drop_tokens=False, num_shared_experts=num_shared,
                    shared_expert_gate=gate, top2_2nd_expert_sampling=False)
    moe = MoEFeedForward(ffn, DIM, 4, cfg).train()
    torch.manual_seed(3)
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0, 0.2)
    return moe


def swiglu(x: torch.Tensor, gate_w, up_w, down_w) -> torch.Tensor:
    return (F.silu(x @ gate_w.t()) * (x @ up_w.t())) @ down_w.t()


@pytest.mark.parametrize("moe_impl", ["grouped", "deepspeed"])
@pytest.mark.parametrize("gate", [False, True])
@torch.no_grad()
def test_layer_output_is_routed_plus_gated_shared(moe_impl, gate):
    moe = layer(num_shared=2, gate=gate, moe_impl=moe_impl)
    x = torch.randn(2, 12, DIM)
    routed = moe.moe(x)[0]
    shared = moe.shared_experts
    shared_out = swiglu(x, shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
    if gate:
        shared_out = torch.sigmoid(x @ moe.shared_expert_gate.weight.t()) * shared_out
    torch.testing.assert_close(moe(x), routed + shared_out, rtol=1e-5, atol=1e-5)


def test_initialisation_copies_scales_or_draws():
    def shared_weights(expert_init, seed=0, num_shared=2):
        model = convert_to_moe(tiny_model(), MoEConfig(num_experts=4, num_shared_experts=num_shared,
                                                       shared_expert_gate=True, expert_init=expert_init), seed=seed)
        return moe_layers_of(model)[0], {n: p.detach().clone() for n, p in
                                         moe_layers_of(model)[0].shared_experts.named_parameters()}

    dense = tiny_model().model.layers[0].mlp
    copied_layer, copied = shared_weights("copy")
    for block in range(2):  # each block of 256 units is the dense FFN, its output scaled by 2 x 1/3 (gate at 1/2)
        units = slice(256 * block, 256 * (block + 1))
        torch.testing.assert_close(copied["up_proj.weight"][units], dense.up_proj.weight, rtol=0, atol=0)
        torch.testing.assert_close(copied["down_proj.weight"][:, units], dense.down_proj.weight * 2 / 3)
    torch.testing.assert_close(copied_layer.local_expert_weights()[1]["down_proj.weight"], dense.down_proj.weight / 3)
    assert torch.equal(copied_layer.shared_expert_gate.weight, torch.zeros(1, 128))

    noisy = shared_weights("copy_noise")[1]["up_proj.weight"]
    assert not torch.equal(noisy[:256], noisy[256:])  # the noise tells the copies apart

    random_layer, drawn = shared_weights("random")
    assert torch.equal(drawn["up_proj.weight"], shared_weights("random")[1]["up_proj.weight"])  # seeded
    assert not torch.equal(drawn["up_proj.weight"], shared_weights("random", seed=1)[1]["up_proj.weight"])
    assert drawn["up_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)  # initializer_range
    for expert in random_layer.local_expert_weights():  # its own stream, not an expert's
        assert not torch.equal(expert["up_proj.weight"], drawn["up_proj.weight"][:256])
    assert not torch.equal(random_layer.router.wg.weight, drawn["up_proj.weight"][:4])


def test_exact_copies_get_equal_gradients():
    """Why docs/routing.md suggests copy_noise for N > 1: copied blocks see the same inputs and the same upstream
    gradient, so they stay equal."""
    model = convert_to_moe(tiny_model().train(), MoEConfig(num_experts=4, num_shared_experts=2, drop_tokens=False))
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    grad = moe_layers_of(model)[0].shared_experts.up_proj.weight.grad
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad[:256], grad[256:], rtol=0, atol=0)


@torch.no_grad()
def test_metrics_follow_their_formulas():
    moe = layer(num_shared=2, gate=True)
    xs = [torch.randn(2, 12, DIM), torch.randn(1, 8, DIM)]
    shares, gates = [], []
    for x in xs:
        moe(x)
        routed = moe.moe(x)[0].reshape(-1, DIM)
        gate = torch.sigmoid(x.reshape(-1, DIM) @ moe.shared_expert_gate.weight.t())
        shared = gate * moe.shared_experts(x).reshape(-1, DIM)
        shares += (shared.norm(dim=-1) / (shared.norm(dim=-1) + routed.norm(dim=-1))).tolist()
        gates += gate.squeeze(-1).tolist()
    moe.eval()(xs[0])  # eval forwards are not counted
    stats = MoELayers(moe)
    row = stats.interval_metrics(stats.interval_sums(torch.device("cpu")))
    assert row["moe/layer_0/shared_share"] == pytest.approx(sum(shares) / len(shares), rel=1e-6)
    assert row["moe/layer_0/shared_gate"] == pytest.approx(sum(gates) / len(gates), rel=1e-6)
    assert 0 < row["moe/layer_0/shared_share"] < 1
    assert row["moe/layer_0/routed_tokens"] == 32
    assert "moe/layer_0/shared_share" not in stats.interval_metrics(stats.interval_sums(torch.device("cpu")))


@torch.no_grad()
def test_an_upcycled_model_starts_with_a_shared_share_of_n_over_n_plus_1():
    model = convert_to_moe(tiny_model().train(), MoEConfig(num_experts=4, num_shared_experts=3, drop_tokens=False))
    model(tokens())
    stats = MoELayers(model)
    row = stats.interval_metrics(stats.interval_sums(torch.device("cpu")))
    assert [row[f"moe/layer_{i}/shared_share"] for i in range(4)] == pytest.approx([3 / 4] * 4, rel=1e-5)


def test_metrics_only_with_shared_experts():
    plain, ungated = layer(num_shared=0, gate=False), layer(num_shared=1, gate=False)
    for moe in (plain, ungated):
        moe(torch.randn(1, 8, DIM))
    stats = MoELayers(torch.nn.ModuleList([plain, ungated]))
    row = stats.interval_metrics(stats.interval_sums(torch.device("cpu")))
    assert "moe/layer_0/shared_share" not in row and "moe/layer_1/shared_share" in row
    assert not any(key.endswith("shared_gate") for key in row)
    assert plain.shared_experts is None and plain.shared_expert_gate is None


def test_every_token_multiplies_by_the_shared_experts():
    """MFU's active parameters: top_k experts, the router, and the N shared experts and their gate, whole."""
    dense = tiny_model()
    dense_params = sum(p.numel() for p in dense.parameters())  # tied embeddings: no lookup table to leave out
    ffn = sum(p.numel() for p in dense.model.layers[0].mlp.parameters())
    moe = convert_to_moe(dense, MoEConfig(num_experts=4, top_k=2, num_shared_experts=3, shared_expert_gate=True))
    router, gate = 4 * 128, 128  # E x D, 1 x D
    assert active_parameters(moe, moe_layers_of(moe)) == dense_params + 4 * (ffn + router + 3 * ffn + gate)


@pytest.mark.parametrize("settings, message", [
    (dict(num_shared_experts=-1), "num_shared_experts (-1) must be >= 0"),
    (dict(shared_expert_gate=True), "shared_expert_gate gates the shared experts' output, but num_shared_experts is "
                                    "0: pass --num_shared_experts 1 or more, or drop --shared_expert_gate"),
    (dict(num_shared_experts=1, use_residual=True), "use_residual and num_shared_experts both keep an always-on"),
])
def test_settings_that_do_not_go_together_are_refused(settings, message):
    assert any(message in problem for problem in moe_problems(MoEConfig(**settings)))
    with pytest.raises(ConfigError, match="Invalid settings"):
        convert_to_moe(tiny_model(), MoEConfig(**settings))


FLAGS = ["--num_experts", "4", "--synthetic_examples", "400", "--block_size", "32", "--eval_steps", "0",
         "--max_eval_batches", "1", "--disable_tqdm", "--warmup_steps", "1", "--per_device_train_batch_size", "2",
         "--logging_steps", "1", "--num_shared_experts", "2", "--shared_expert_gate", "--expert_init", "copy_noise",
         "--top2_2nd_expert_sampling", "false"]


def logged(output_dir):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [value for r in rows if "loss" in r
            for value in (r["loss"], r["moe/layer_0/shared_share"], r["moe/layer_3/shared_gate"])]


def test_a_run_logs_them_per_layer_and_resumes_exactly(world, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main([*FLAGS, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(full)])
    train.main([*FLAGS, "--max_steps", "4", "--output_dir", str(resumed),
                "--resume_from_checkpoint", str(full / "checkpoints" / "global_step2")])
    values = logged(full)  # loss, shared share, gate of step 1, then of step 2, ...
    assert len(values) == 12 and all(0 < v < 1 for v in values[1::3] + values[2::3])
    assert logged(resumed) == pytest.approx(values[6:], rel=1e-6)


def test_the_engine_reduces_them_with_the_data_parallel_parameters(world, tmp_path):
    """No expert mark (DeepSpeed's allreduce=False), and in the ZeRO optimizer's non-expert groups, which are
    reduced over every rank (expert groups: over the expert-data-parallel group)."""
    _, trainer = train.build(parse_args([*FLAGS, "--max_steps", "1", "--output_dir", str(tmp_path)]))
    zero, layer = trainer.engine.optimizer, moe_layers_of(trainer.engine.module)[0]
    shared = [*layer.shared_experts.parameters(), layer.shared_expert_gate.weight]
    assert all(getattr(p, "allreduce", True) for p in shared)
    in_expert_group = {id(p): is_moe for group, is_moe in zip(zero.bit16_groups, zero.is_moe_param_group)
                       for p in group}
    assert not any(in_expert_group[id(p)] for p in shared)
    assert all(in_expert_group[id(p)] for p in layer.experts.parameters())
