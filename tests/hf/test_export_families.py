"""Export of every family with a matching transformers MoE class, and back: stock ``AutoModelForCausalLM`` computes
the converted model's function, and the exported folder, continued in place, computes the stock class's.

The converted models are not trained (train.py's own export path is tests/hf/test_export.py): random experts and
routers scaled up so that routes differ, saved as a folder MoETrainer writes (model.safetensors, moe_config.json,
tokenizer), which export reads."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moe_models import convert_to_moe
from moe_models.hf.configs import MOE_CLASSES, NotRepresentable, hf_moe_config
from moe_models.hf.export_table import export_table_markdown, with_export_table
from moe_models.hf.exporter import export
from moe_models.hf.in_place import fused_experts_of
from moe_models.hf.in_place_run import continue_in_place
from moe_models.models.tokenization import BYTE_VOCAB_SIZE, byte_level_tokenizer
from moe_models.moe.layer import ROUTER_SCORE_BIAS, ROUTER_WEIGHT
from moe_models.run.config import MoEConfig
from moe_models.run.folder import RunFolder
from moe_models.run.moe_layout import MoELayout

TINY = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            tie_word_embeddings=True, bos_token_id=BYTE_VOCAB_SIZE - 1, eos_token_id=BYTE_VOCAB_SIZE - 1,
            pad_token_id=BYTE_VOCAB_SIZE - 1)
# Granite's four scalings, none of them 1, so that each must be carried over
GRANITE = dict(TINY, embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.2,
               attention_bias=True)
EXACT = dict(num_experts=4, expert_init="random", drop_tokens=False, top2_2nd_expert_sampling=False)

# dense model_type and config, MoE settings, the class it exports to
CASES = {
    "granite": ("granite", GRANITE, dict(top_k=2), "GraniteMoeForCausalLM"),
    "granite_shared": ("granite", GRANITE, dict(top_k=3, num_shared_experts=1), "GraniteMoeSharedForCausalLM"),
    # windows of 8 (the probe is 24 long) in 3 of 4 blocks, attention sinks, NoPE in block 2
    "granite_swa": ("granite_swa", dict(GRANITE, sliding_window=8, layer_rope_theta=[10000.0, 500.0, 0, 10000.0]),
                    dict(top_k=2, num_shared_experts=1), "GraniteMoeSWAForCausalLM"),
    "olmo2": ("olmo2", dict(TINY, attention_bias=True), dict(top_k=2), "FlexOlmoForCausalLM"),
    # DeepSpeed's top-1 keeps the probability: FlexOlmo with norm_topk_prob false
    "olmo2_top1": ("olmo2", TINY, dict(top_k=1), "FlexOlmoForCausalLM"),
    "hunyuan": ("hunyuan_v1_dense", TINY, dict(top_k=2, num_shared_experts=1), "HunYuanMoEV1ForCausalLM"),
    # softmax scores with the aux-loss-free bias, sparse blocks 1 and 3 beside dense ones, 2 shared experts
    "ernie": ("ernie4_5", TINY, dict(top_k=2, moe_layers="every:2", num_shared_experts=2,
                                     router_bias_update_rate=0.01), "Ernie4_5_MoeForCausalLM"),
    # a parallel attention + FFN block, LayerNorm, logit_scale, windows of 8 in 3 of 4 blocks (the probe is 24 long);
    # dense blocks 0 and 3 (a sliding and a full-attention one) beside the sparse ones
    "cohere2": ("cohere2", dict(TINY, sliding_window=8, logit_scale=0.5),
                dict(top_k=2, moe_layers="1,2", num_shared_experts=1), "Cohere2MoeForCausalLM"),
}
CONTINUED = ["granite", "granite_shared", "granite_swa", "olmo2", "olmo2_top1", "hunyuan", "ernie", "cohere2"]


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, BYTE_VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, world, tmp_path_factory):
    """One case converted (random experts, routers 30x their init so that weights differ between routes, random
    router biases and attention sinks), saved as MoETrainer saves it, and exported."""
    model_type, fields, settings, hf_class = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    moe = MoEConfig(**EXACT, **settings)
    layout = MoELayout.resolve(moe, dense.config.num_hidden_layers)
    model = convert_to_moe(dense, moe, seed=0).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith(ROUTER_WEIGHT):
                tensor.mul_(30)
            elif name.endswith(ROUTER_SCORE_BIAS):
                tensor.normal_(0, 0.1)
            elif name.endswith("sinks"):  # Granite-SWA's attention sinks start at zero
                tensor.normal_()
    model.save_pretrained(root / "trained")
    RunFolder(root / "trained").write_moe_settings(moe, layout)
    byte_level_tokenizer().save_pretrained(root / "trained")
    export(root / "trained", root / "hf")
    return {"name": request.param, "model": model, "hf_dir": root / "hf", "hf_class": hf_class}


@torch.no_grad()
def test_the_exported_class_computes_the_converted_function(exported):
    hf = AutoModelForCausalLM.from_pretrained(exported["hf_dir"], dtype=torch.float32).eval()
    assert type(hf).__name__ == exported["hf_class"]
    assert "auto_map" not in json.loads((exported["hf_dir"] / "config.json").read_text())  # no remote code
    ids = tokens()
    expected = exported["model"](ids).logits
    torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-4, atol=1e-4)
    # the routing matters: the same model with its experts' outputs weighed equally computes something else
    gate_up = next(p for n, p in hf.named_parameters() if n.endswith("gate_up_proj") or n.endswith("input_linear"))
    assert not torch.allclose(gate_up[0], gate_up[1])


@torch.no_grad()
@pytest.mark.parametrize("exported", ["ernie"], indirect=True)
def test_the_router_bias_is_exported_and_steers_the_choice(exported):
    hf = AutoModelForCausalLM.from_pretrained(exported["hf_dir"], dtype=torch.float32).eval()
    biases = [p for name, p in hf.named_parameters() if name.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)  # blocks 1 and 3
    ids = tokens()
    with_bias = hf(ids).logits
    for bias in biases:
        bias.zero_()
    assert not torch.allclose(hf(ids).logits, with_bias, atol=1e-3)


def continued(folder: Path) -> tuple[torch.nn.Module, MoEConfig]:
    """The folder continued in place as train.py does it (ep_size 1, fp32): its model and the settings that describe
    it."""
    model, settings, _ = continue_in_place(str(folder), MoEConfig(), torch.float32, BYTE_VOCAB_SIZE)
    return model, settings


@pytest.mark.parametrize("exported", CONTINUED, indirect=True)
def test_the_exported_folder_continues_in_place_and_trains(exported):
    """Continued in place for further training: its own class, the stock class's logits, and the loss reaches
    every expert and router."""
    model, moe = continued(exported["hf_dir"])
    trained_moe, trained_layout = exported["model"].moe_settings
    assert type(model).__name__ == exported["hf_class"]
    assert (moe.num_experts, moe.top_k) == (4, trained_moe.top_k)
    assert moe.moe_layers == list(trained_layout.blocks)
    hf = AutoModelForCausalLM.from_pretrained(exported["hf_dir"], dtype=torch.float32).eval()
    ids = tokens(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    loss = model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    experts = {id(p) for layer in fused_experts_of(model) for p in layer.parameters()}
    routers = [name for name, p in model.named_parameters() if id(p) not in experts and p.shape[0] == 4
               and name.endswith(("gate.weight", "router.weight", "gate.wg.weight"))]
    assert len(routers) == len(trained_layout.blocks)
    for name, param in model.named_parameters():
        if id(param) in experts or name in routers:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


FOREIGN = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, pad_token_id=BYTE_VOCAB_SIZE - 1)
FULL_ROTARY = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                   partial_rotary_factor=1.0)


@pytest.mark.parametrize("moe_type, fields, sparse_blocks", [
    ("granitemoe", dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                        residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.2), [0, 1, 2]),
    ("granitemoeshared", dict(num_local_experts=4, num_experts_per_tok=1, shared_intermediate_size=192), [0, 1, 2]),
    ("flex_olmo", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False), [0, 1, 2]),
    ("hunyuan_v1_moe", dict(num_experts=4, moe_topk=2, head_dim=16), [0, 1, 2]),
    ("ernie4_5_moe", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=96, moe_num_shared_experts=1,
                          moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1), [1, 2]),
    # a dense block 0 twice as wide as the experts, q/k norms, shared experts, a routed scaling factor
    ("glm4_moe", dict(n_routed_experts=4, num_experts_per_tok=3, moe_intermediate_size=48, n_shared_experts=2,
                      first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=False, use_qk_norm=True,
                      routed_scaling_factor=1.5, head_dim=16, **FULL_ROTARY), [1, 2]),
    # group-limited routing: 8 experts in 4 groups, each token inside its best 2 (DeepSeek-V3's rule)
    ("glm4_moe", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=96, n_shared_experts=0,
                      first_k_dense_replace=0, n_group=4, topk_group=2, norm_topk_prob=True, head_dim=16,
                      **FULL_ROTARY), [0, 1, 2]),
    # a dense first block twice as wide as the experts, a summed shared expert, top-1
    ("cohere2_moe", dict(num_experts=4, num_experts_per_tok=1, intermediate_size=48, head_dim=16, sliding_window=8,
                         mlp_layer_types=["dense", "sparse", "sparse"], prefix_dense_intermediate_size=96,
                         prefix_dense_sliding_window_pattern=2, num_shared_experts=2,
                         shared_expert_combination_strategy="sum", bos_token_id=1, eos_token_id=2), [1, 2]),
])
@torch.no_grad()
def test_a_checkpoint_made_by_transformers_continues_with_its_function(world, tmp_path, moe_type, fields,
                                                                       sparse_blocks):
    """The HF class built by transformers itself (random weights and router biases, the hub's layout on disk)
    continues in place exactly: the model with its experts swapped computes its logits."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(moe_type, **{**FOREIGN, **fields})).eval()
    for name, tensor in [*hf.named_parameters(), *hf.named_buffers()]:
        if name.endswith(("gate.weight", "router.weight", "gate.wg.weight")) and tensor.shape[0] in (4, 8):
            tensor.mul_(30)  # routers that tell experts apart
        elif name.endswith("e_score_correction_bias"):
            tensor.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    model, moe = continued(tmp_path)
    config = hf.config
    assert moe.num_experts == next(fields[name] for name in ("num_local_experts", "num_experts", "moe_num_experts",
                                                             "n_routed_experts") if name in fields)
    assert moe.top_k == next(fields[name] for name in ("num_experts_per_tok", "moe_topk", "moe_k") if name in fields)
    assert moe.moe_layers == sparse_blocks and config.model_type == moe_type
    ids = tokens()
    torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type, fields, settings, message", [
    ("granite", GRANITE, dict(top_k=1), "top_k 1: DeepSpeed scales the chosen expert's output by its router "
                                        "probability, GraniteMoe gives it weight 1.0"),
    ("granite", dict(GRANITE, mlp_bias=True), {}, "mlp_bias is true: GraniteMoe's experts have no biases"),
    ("granite", GRANITE, dict(score_function="sigmoid"), "--score_function sigmoid: GraniteMoe scores by softmax"),
    ("granite", GRANITE, dict(num_shared_experts=1, shared_expert_gate=True),
     "shared_expert_gate: GraniteMoeShared's shared experts have no gate"),
    ("olmo2", TINY, dict(moe_layers="every:2"), "FlexOlmo has an MoE FFN in every block"),
    ("olmo2", TINY, dict(num_shared_experts=1), "num_shared_experts 1: FlexOlmo has no shared expert"),
    ("olmo2", TINY, dict(router_bias_update_rate=0.01), "FlexOlmo chooses experts without a bias"),
    ("hunyuan_v1_dense", TINY, {}, "num_shared_experts 0: HunYuan-MoE adds exactly one shared expert"),
    ("hunyuan_v1_dense", TINY, dict(num_shared_experts=2), "train with --num_shared_experts 1"),
    ("ernie4_5", TINY, dict(moe_layers="0,2"), "MoE blocks [0, 2]: ERNIE-4.5-MoE makes block i sparse when (i + 1)"),
    ("ernie4_5", dict(TINY, use_bias=True), {}, "use_bias is true: ERNIE-4.5-MoE's experts have no biases"),
    ("ernie4_5", TINY, dict(routed_scaling_factor=2.0), "ERNIE-4.5-MoE does not scale the routed output"),
    ("olmo", TINY, {}, "olmo has no Mixture-of-Experts class in transformers (OLMoE and FlexOlmo have RMSNorm"),
])
def test_what_the_target_class_cannot_compute_is_refused(model_type, fields, settings, message):
    dense = AutoConfig.for_model(model_type, **fields)
    moe = MoEConfig(num_experts=4, **settings)
    with pytest.raises(NotRepresentable, match="cannot be represented exactly") as err:
        hf_moe_config(dense, moe, MoELayout.resolve(moe, dense.num_hidden_layers))
    assert message in str(err.value)


@pytest.mark.parametrize("moe_layers, start_end_interval", [("all", (0, 3, 1)), ("every:2", (1, 3, 2)),
                                                            ("2,3", (2, 3, 1)), ("2", (2, 2, 3))])
def test_ernie_sparse_blocks_are_the_layout(moe_layers, start_end_interval):
    """ERNIE-4.5-MoE's own decoder makes exactly the layout's blocks sparse."""
    moe = MoEConfig(num_experts=4, moe_layers=moe_layers)
    layout = MoELayout.resolve(moe, 4)
    config = hf_moe_config(AutoConfig.for_model("ernie4_5", **TINY), moe, layout)
    start, end, interval = start_end_interval
    assert (config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval) == (start, end,
                                                                                                     interval)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    sparse = [i for i, block in enumerate(hf.model.layers) if hasattr(block.mlp, "experts")]
    assert sparse == list(layout.blocks)


def test_every_export_class_is_documented_with_its_hf_class():
    for moe_type, target in MOE_CLASSES.items():
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[moe_type] == target.hf_class


def test_export_doc_tables_match_the_code():
    path = Path(__file__).resolve().parents[2] / "docs" / "export.md"
    if os.environ.get("UPDATE_DOCS") == "1":
        path.write_text(with_export_table(path.read_text()))
    assert export_table_markdown() in path.read_text(), \
        "docs/export.md's export tables are stale: UPDATE_DOCS=1 pytest tests/hf/test_export_families.py -k doc"
