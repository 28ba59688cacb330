"""Families not in the architecture table: inspection finds their FFN, the proof refuses what it gets wrong, and
the refusals say what was found and what to do."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_models import MoEConfig, convert_to_moe
from moe_models.models.architectures import architecture_of, architecture_of_config
from moe_models.models.probe import small_config


def small(model_type, **overrides):
    config = small_config(AutoConfig.for_model(model_type))
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type, blocks, ffn, projections", [
    ("phi3", "model.layers", "mlp", (("gate_up_proj",), "down_proj")),
    ("gpt_neox", "gpt_neox.layers", "mlp", (("dense_h_to_4h",), "dense_4h_to_h")),
    ("gemma3", "model.language_model.layers", "mlp", (("gate_proj", "up_proj"), "down_proj")),  # not the vision tower
])
def test_inspection_finds_the_block_ffn(model_type, blocks, ffn, projections):
    model = small(model_type)
    arch = architecture_of(model)
    assert (arch.blocks, arch.ffn, arch.ffn_projections, arch.discovered) == (blocks, ffn, projections, True)
    assert architecture_of_config(model.config) == arch  # from the config alone (a meta-device model)


def test_an_ffn_written_inline_in_the_block_is_refused_with_what_was_found():
    with pytest.raises(ValueError, match=r"model type 'opt': no child of its block \(OPTDecoderLayer: .*fc1 "
                                         r"\(Linear\).*ARCHITECTURES"):
        convert_to_moe(small("opt"), MoEConfig(num_experts=2))


def test_an_moe_model_is_refused_as_one():
    with pytest.raises(ValueError, match="'mixtral' is already a Mixture of Experts"):
        architecture_of(small("mixtral"))


def test_the_proof_refuses_an_ffn_the_block_calls_with_more_than_the_hidden_states():
    with pytest.raises(ValueError, match=r"'bloom': the converted probe model fails .*'residual'.*found: by "
                                         r"inspection, blocks 'transformer.h', FFN 'mlp'.*--prove_conversion false"):
        convert_to_moe(small("bloom"), MoEConfig(num_experts=2))
    converted = convert_to_moe(small("bloom"), MoEConfig(num_experts=2, prove_conversion=False))  # on the user's word
    with pytest.raises(TypeError, match="residual"):
        converted(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_the_proof_draws_nothing_from_the_run_generators():
    """The same conversion with and without the proof leaves the global generator in the same state (so from-scratch
    weights and everything drawn after surgery are the same)."""
    def draws_after_converting(prove: bool) -> torch.Tensor:
        model = small("starcoder2", initializer_range=0.03)  # a config no other test proves: the proof runs here
        torch.manual_seed(5)
        convert_to_moe(model, MoEConfig(num_experts=2, expert_init="copy", prove_conversion=prove))
        return torch.rand(3)

    assert torch.equal(draws_after_converting(True), draws_after_converting(False))
