"""Export to native HF MoE classes and continue the export in place: the same function, the same loss, clear
refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.moe.utils import is_moe_param
from helpers import REPO, child_env
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import train  # a script at the repository root (pytest puts the root on sys.path)
from moe_models import convert_to_moe
from moe_models.export import main as export_main
from moe_models.hf.configs import NotRepresentable, hf_moe_config
from moe_models.hf.exporter import export
from moe_models.hf.in_place import fused_experts_of
from moe_models.hf.in_place_load import load_in_place
from moe_models.hf.in_place_run import continue_in_place
from moe_models.models.source import preset_config
from moe_models.models.tokenization import byte_level_tokenizer
from moe_models.moe.layer import EXPERTS_MODULE, ROUTER_WEIGHT, moe_layers_of
from moe_models.run.cli import parse_args
from moe_models.run.config import MoEConfig
from moe_models.run.moe_layout import MoELayout, resolve_moe_layers

# Deterministic, dropless routing: the condition under which DeepSpeed and the HF classes compute the same function.
# They are the defaults, so the cases below train with the default routing: a default run exports exactly.
SHORT = ["--synthetic_examples", "300", "--block_size", "64", "--per_device_train_batch_size", "4",
         "--warmup_steps", "1", "--learning_rate", "1e-2", "--eval_steps", "0", "--max_eval_batches", "1",
         "--disable_tqdm"]

# preset, MoE flags, the class it exports to. Experts start random so that they differ.
CASES = {
    "llama": ("tiny-llama", ["--top_k", "2"], "MixtralForCausalLM"),
    "mistral": ("tiny-mistral", ["--top_k", "3"], "MixtralForCausalLM"),
    "qwen2": ("tiny-qwen2", ["--top_k", "2", "--moe_layers", "every:2"], "Qwen2MoeForCausalLM"),
    "qwen3": ("tiny-qwen3", ["--top_k", "1", "--moe_layers", "0,3"], "Qwen3MoeForCausalLM"),
    # sigmoid scores with the aux-loss-free bias (it moves 0.05 a step, enough to change choices) -> GLM4-MoE
    "llama_sigmoid": ("tiny-llama", ["--top_k", "2", "--score_function", "sigmoid", "--router_bias_update_rate", "0.05",
                                     "--routed_scaling_factor", "2.5"], "Glm4MoeForCausalLM"),
    "qwen2_sigmoid": ("tiny-qwen2", ["--top_k", "3", "--score_function", "sigmoid", "--norm_topk_prob", "false",
                                     "--router_bias_update_rate", "0.05", "--moe_layers", "2,3"], "Glm4MoeForCausalLM"),
    "qwen3_sigmoid": ("tiny-qwen3", ["--top_k", "1", "--score_function", "sigmoid", "--router_bias_update_rate", "0.05",
                                     "--norm_topk_prob", "true"], "Glm4MoeForCausalLM"),
    # ... with shared experts and group-limited routing: 2 groups of 2 experts, each token inside its best one
    "llama_sigmoid_shared": ("tiny-llama", ["--top_k", "2", "--score_function", "sigmoid", "--num_shared_experts", "2",
                                            "--expert_groups", "2", "--max_groups_per_token", "1"],
                             "Glm4MoeForCausalLM"),
    # shared experts: with their gate; without it (a zero gate and a doubled down projection); Llama -> Granite
    "qwen2_shared_gate": ("tiny-qwen2", ["--top_k", "2", "--moe_layers", "every:2", "--num_shared_experts", "2",
                                         "--shared_expert_gate"], "Qwen2MoeForCausalLM"),
    "qwen2_shared": ("tiny-qwen2", ["--top_k", "2", "--num_shared_experts", "1"], "Qwen2MoeForCausalLM"),
    "llama_shared": ("tiny-llama", ["--top_k", "2", "--num_shared_experts", "2"], "GraniteMoeSharedForCausalLM"),
    "mistral_shared": ("tiny-mistral", ["--top_k", "3", "--num_shared_experts", "1", "--moe_impl", "deepspeed"],
                       "GraniteMoeSharedForCausalLM"),
    # experts of F/2 beside dense blocks of F: moe_intermediate_size and intermediate_size differ
    "qwen2_granular": ("tiny-qwen2", ["--top_k", "2", "--moe_layers", "every:2", "--expert_init", "granular",
                                      "--granularity", "2"], "Qwen2MoeForCausalLM"),
}


def tokens(batch=2, length=48, seed=0):
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, world, tmp_path_factory):
    """A short train.py run of one case (checkpoint on disk, engine in memory) and its export."""
    preset, flags, hf_class = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    cfg = parse_args(["--model_config", preset, "--num_experts", "4", "--expert_init", "random", "--max_steps", "3",
                      *flags, *SHORT, "--output_dir", str(root / "run")])
    _, trainer = train.build(cfg)
    trainer.train()
    export(root / "run" / "checkpoints", root / "hf")
    return {"name": request.param, "cfg": cfg, "ds_model": trainer.engine.module.eval(), "hf_dir": root / "hf",
            "hf_class": hf_class, "root": root}


@torch.no_grad()
def test_export_loads_natively_and_computes_the_deepspeed_function(exported):
    hf = AutoModelForCausalLM.from_pretrained(exported["hf_dir"], dtype=torch.float32).eval()
    assert type(hf).__name__ == exported["hf_class"]
    config = json.loads((exported["hf_dir"] / "config.json").read_text())
    assert "auto_map" not in config  # no remote code
    if exported["cfg"].moe.max_groups_per_token:  # group-limited routing: GLM4-MoE's own groups
        assert (config["n_group"], config["topk_group"]) == (exported["cfg"].moe.expert_groups,
                                                              exported["cfg"].moe.max_groups_per_token)
    gate_up = next(p for n, p in hf.named_parameters() if n.endswith("experts.gate_up_proj"))
    assert not torch.allclose(gate_up[0], gate_up[1])  # the experts differ, so routing matters
    ids = tokens()
    torch.testing.assert_close(hf(ids).logits, exported["ds_model"](ids).logits, rtol=1e-4, atol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(exported["hf_dir"])
    assert tokenizer.decode(tokenizer("37+48=85")["input_ids"]) == "37+48=85"


@pytest.mark.parametrize("exported", ["qwen2_granular"], indirect=True)
def test_granular_experts_export_as_moe_intermediate_size_beside_dense_blocks(exported):
    config = json.loads((exported["hf_dir"] / "config.json").read_text())
    assert (config["intermediate_size"], config["moe_intermediate_size"]) == (256, 128)
    hf = AutoModelForCausalLM.from_pretrained(exported["hf_dir"], dtype=torch.float32)
    assert hf.model.layers[1].mlp.experts.down_proj.shape == (4, 128, 128)  # [E, D, F/G]
    assert hf.model.layers[0].mlp.down_proj.weight.shape == (128, 256)  # a dense block: [D, F]


@torch.no_grad()
@pytest.mark.parametrize("exported", ["llama_sigmoid"], indirect=True)
def test_the_aux_loss_free_bias_is_exported_and_steers_the_choice(exported):
    hf = AutoModelForCausalLM.from_pretrained(exported["hf_dir"], dtype=torch.float32).eval()
    biases = [buffer for name, buffer in hf.named_buffers() if name.endswith("gate.e_score_correction_bias")]
    assert len(biases) == 4 and all(b.abs().sum() > 0 for b in biases)
    ids = tokens()
    with_bias = hf(ids).logits
    for bias in biases:
        bias.zero_()
    assert not torch.allclose(hf(ids).logits, with_bias, atol=1e-3)


# Mixtral; Qwen3-MoE with dense blocks, top-1; Qwen2-MoE with a shared expert, its gate trained or the exported zero
# one; Qwen2-MoE whose dense blocks are wider than its experts; GraniteMoeShared from Llama (imported as Granite);
# GLM4-MoE with its trained router biases (imported as Llama, Qwen2 or Qwen3)
@pytest.mark.parametrize("exported", ["llama", "qwen3", "qwen2_shared_gate", "qwen2_granular", "llama_shared",
                                      "llama_sigmoid", "llama_sigmoid_shared"], indirect=True)
def test_the_export_continues_in_place_where_it_left_off(exported, tmp_path, capsys):
    """train.py on the exported folder continues it in place: its own class, the checkpoint's experts and top-k,
    and the first training loss is the stock class's loss on that batch, its balance loss included."""
    cfg = parse_args(["--model_name_or_path", str(exported["hf_dir"]), "--max_steps", "1", *SHORT,
                      "--output_dir", str(tmp_path / "continued")])
    _, trainer = train.build(cfg)
    out = capsys.readouterr().out
    assert f"start-up: continuing {exported['hf_dir']} in place" in out
    record = json.loads((tmp_path / "continued" / "run_config.json").read_text())
    assert record["resolved"]["imported_from"] == str(exported["hf_dir"])
    trained, moe = exported["cfg"].moe, trainer.cfg.moe  # the checkpoint's settings, not the defaults
    assert (moe.num_experts, moe.top_k) == (trained.num_experts, trained.top_k)
    assert (record["moe"]["num_experts"], record["moe"]["top_k"]) == (trained.num_experts, trained.top_k)
    assert moe.moe_layers == resolve_moe_layers(trained.moe_layers, 4)

    model = trainer.engine.module
    assert type(model).__name__ == exported["hf_class"]
    expert_params = [p for layer in fused_experts_of(model) for p in layer.parameters()]
    assert expert_params and all(map(is_moe_param, expert_params))  # DeepSpeed's expert marks
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    position = trainer.batches.state_dict()
    input_ids = next(trainer.batches)["input_ids"]
    trainer.batches.load_state_dict(position)
    first_loss = trainer.train_step().item()
    hf = AutoModelForCausalLM.from_pretrained(exported["hf_dir"], dtype=torch.float32).eval()
    hf.config.output_router_logits = True  # (GraniteMoeShared's forward passes its flag argument on to no one)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, labels=input_ids).loss.item()
    assert first_loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("exported", ["llama"], indirect=True)
def test_both_expert_layouts_on_disk_continue_alike(exported, tmp_path):
    """save_pretrained writes one tensor per expert (the hub's layout); transformers' own fused layout reads the same."""
    fused_dir = tmp_path / "fused"
    AutoModelForCausalLM.from_pretrained(exported["hf_dir"]).save_pretrained(fused_dir, save_original_format=False)
    per_expert, fused = load_in_place(exported["hf_dir"]), load_in_place(fused_dir)
    for (name, a), (_, b) in zip(per_expert.state_dict().items(), fused.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("moe_type, extra", [
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=1)),
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=3, norm_topk_prob=False, moe_intermediate_size=256,
                       head_dim=32)),
    ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=256,
                       shared_expert_intermediate_size=512, mlp_only_layers=[0])),  # a gated shared expert
    # dense blocks 4x wider than the experts
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=64,
                       mlp_only_layers=[1], head_dim=32)),
])
@torch.no_grad()
def test_a_foreign_checkpoint_continues_in_place_with_its_function(world, tmp_path, moe_type, extra):
    """An HF MoE model made by transformers itself (random weights, the hub's on-disk layout) continues exactly."""
    config = AutoConfig.for_model(moe_type, vocab_size=257, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path)
    model, moe, _ = continue_in_place(str(tmp_path), MoEConfig(), torch.float32, 257)
    assert moe.num_experts == 4 and moe.top_k == config.num_experts_per_tok
    assert moe.moe_layers == [i for i in range(2) if i not in extra.get("mlp_only_layers", [])]
    ids = tokens()
    torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_layer_names_match_deepspeed():
    model = AutoModelForCausalLM.from_config(preset_config("tiny-llama"))
    layer = moe_layers_of(convert_to_moe(model, MoEConfig(num_experts=2)))[0]
    assert dict(layer.named_parameters())[ROUTER_WEIGHT] is layer.router.wg.weight
    state = layer.state_dict()  # experts under DeepSpeed's per-expert names, whichever path holds them
    assert torch.equal(state[f"{EXPERTS_MODULE}.deepspeed_experts.1.up_proj.weight"],
                       layer.local_expert_weights()[1]["up_proj.weight"])


@pytest.mark.parametrize("preset, moe, overrides, message", [
    ("tiny-gpt2", MoEConfig(), {}, "gpt2 has no Mixture-of-Experts class in transformers"),
    ("tiny-llama", MoEConfig(top_k=1), {}, "top_k 1: DeepSpeed scales the chosen expert's output by its router "
                                           "probability, Mixtral gives it weight 1.0"),
    ("tiny-mistral", MoEConfig(moe_layers="every:2"), {}, "Mixtral has an MoE FFN in every block"),
    ("tiny-qwen3", MoEConfig(num_experts=[2, 4, 4, 8]), {}, "per-layer expert counts [2, 4, 4, 8]"),
    ("tiny-qwen2", MoEConfig(use_residual=True), {}, "residual MoE (use_residual)"),
    ("tiny-llama", MoEConfig(), {"attention_bias": True}, "attention_bias is true: Mixtral's attention"),
    ("tiny-qwen3", MoEConfig(), {"layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2},
     "Qwen3-MoE applies its window to every block or to none"),
    ("tiny-llama", MoEConfig(router_bias_update_rate=1e-3), {}, "GLM4-MoE has one, with --score_function sigmoid"),
    ("tiny-llama", MoEConfig(expert_groups=2, max_groups_per_token=1), {},
     "Mixtral chooses among all experts (GLM4-MoE chooses within groups"),
    ("tiny-qwen2", MoEConfig(routed_scaling_factor=2.0), {}, "does not scale the routed output"),
    ("tiny-llama", MoEConfig(norm_topk_prob=False), {}, "norm_topk_prob false: Mixtral rescales"),
    ("tiny-llama", MoEConfig(score_function="sigmoid", moe_layers="0,1"), {}, "first_k_dense_replace"),
    ("tiny-mistral", MoEConfig(score_function="sigmoid"), {"sliding_window": 16}, "GLM4-MoE attends over the whole"),
    ("tiny-gpt2", MoEConfig(score_function="sigmoid"), {}, "gpt2 has no Mixture-of-Experts class"),
    ("tiny-qwen2", MoEConfig(score_function="sigmoid", num_shared_experts=1, shared_expert_gate=True), {},
     "GLM4-MoE's shared experts have no gate"),
    ("tiny-qwen3", MoEConfig(num_shared_experts=1), {}, "num_shared_experts 1: Qwen3-MoE has no shared expert"),
    ("tiny-llama", MoEConfig(num_shared_experts=1, shared_expert_gate=True), {},
     "shared_expert_gate: GraniteMoeShared's shared experts have no gate"),
    ("tiny-llama", MoEConfig(num_shared_experts=1, top_k=1), {}, "GraniteMoeShared gives it weight 1.0"),
    ("tiny-mistral", MoEConfig(num_shared_experts=2, moe_layers="every:2"), {},
     "GraniteMoeShared has an MoE FFN in every block"),
    ("tiny-mistral", MoEConfig(num_shared_experts=1), {"sliding_window": 64},
     "sliding_window 64: GraniteMoeShared's attention has no sliding window"),
    ("tiny-llama", MoEConfig(num_shared_experts=1), {"mlp_bias": True}, "mlp_bias is true: GraniteMoeShared's"),
])
def test_unrepresentable_models_are_refused_with_the_reason(preset, moe, overrides, message):
    dense = preset_config(preset)
    for key, value in overrides.items():
        setattr(dense, key, value)
    with pytest.raises(NotRepresentable, match="cannot be represented exactly") as err:
        hf_moe_config(dense, moe, MoELayout.resolve(moe, dense.num_hidden_layers))
    assert message in str(err.value)


def test_every_reason_is_reported_at_once():
    with pytest.raises(NotRepresentable) as err:
        moe = MoEConfig(num_experts=[2, 4, 4, 4], top_k=1, use_residual=True)
        hf_moe_config(preset_config("tiny-llama"), moe, MoELayout.resolve(moe, 4))
    assert len(err.value.problems) == 3


def write_run_without_weights(run_dir: Path, preset: str, moe: dict) -> None:
    """run_config.json, base_model/ and tokenizer/ as train.py writes them; no checkpoint needed for a refusal."""
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.json").write_text(json.dumps({"moe": moe, "resolved": {}}))
    preset_config(preset).save_pretrained(run_dir / "base_model")
    byte_level_tokenizer().save_pretrained(run_dir / "tokenizer")


def test_cli_refusal_is_one_clear_error_and_writes_nothing(tmp_path):
    write_run_without_weights(tmp_path / "run", "tiny-llama", {"num_experts": 4, "use_residual": True})
    result = subprocess.run([sys.executable, "-m", "moe_models.export", "--checkpoint", str(tmp_path / "run" / "checkpoints"),
                             "--output", str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=child_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 1
    assert "error: this llama MoE model cannot be represented exactly:\n  - residual MoE (use_residual)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hf").exists()


def test_cli_help_and_missing_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        export_main(["--help"])
    assert exit_code.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(tmp_path / "checkpoints"), "--output", str(tmp_path / "hf")])
    assert "--checkpoint must be the checkpoints/ folder inside a train.py output folder" in capsys.readouterr().err
    write_run_without_weights(tmp_path / "run", "tiny-llama", {"num_experts": 4})
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--output", str(tmp_path / "hf")])
    assert "has no 'latest' file naming the newest checkpoint; pass --tag" in capsys.readouterr().err


@pytest.mark.parametrize("exported", ["llama"], indirect=True)
def test_cli_notes_how_training_differed(exported, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(exported["root"] / "run", run)
    export_main(["--checkpoint", str(run / "checkpoints"), "--output", str(tmp_path / "new" / "parents" / "exact")])
    assert "note:" not in capsys.readouterr().out  # trained with the default routing: exact
    assert (tmp_path / "new" / "parents" / "exact" / "config.json").is_file()  # missing parents made, as train.py does
    config = json.loads((run / "run_config.json").read_text())
    config["moe"].update(drop_tokens=True, top2_2nd_expert_sampling=True)  # as if trained with DeepSpeed's defaults
    (run / "run_config.json").write_text(json.dumps(config))
    export_main(["--checkpoint", str(run / "checkpoints"), "--output", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert "note: the run dropped tokens above expert capacity" in out
    assert "note: the run picked the second expert with Gumbel noise" in out
    assert f"Wrote MixtralForCausalLM (mixtral) and the tokenizer to {tmp_path / 'hf'}" in out
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(run / "checkpoints"), "--output", str(tmp_path / "hf")])
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err


def test_a_run_that_will_not_export_exactly_says_so_and_how_at_the_start():
    """export_outlook is the line train.py prints before training; the default routing exports exactly (None)."""
    from moe_models.hf.export_fidelity import export_outlook
    llama, gpt2 = preset_config("tiny-llama"), preset_config("tiny-gpt2")
    layout = MoELayout.resolve(MoEConfig(), num_blocks=4)
    assert export_outlook(llama, MoEConfig(), layout) is None
    sampled = export_outlook(llama, MoEConfig(top2_2nd_expert_sampling=True), layout)
    assert sampled.startswith("this run's checkpoints will export to Mixtral inexactly")
    assert sampled.endswith("--top2_2nd_expert_sampling false would make the export exact (docs/export.md)")
    both = export_outlook(llama, MoEConfig(drop_tokens=True, top2_2nd_expert_sampling=True), layout)
    assert "--drop_tokens false --top2_2nd_expert_sampling false would make" in both
    family = export_outlook(gpt2, MoEConfig(), layout)
    assert family.startswith("this run's checkpoints cannot be exported to a native HF MoE class: gpt2 has no "
                             "Mixture-of-Experts class in transformers")
    assert export_outlook(llama, MoEConfig(moe_layers="none"), MoELayout.resolve(MoEConfig(moe_layers="none"), 4)) \
        is None  # a dense run: nothing to export as MoE
