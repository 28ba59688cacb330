"""The family's balance loss in place where transformers 5.17 records no router logits (GraniteMoe's four classes,
Qwen4-Exp): the loss the stock forward then adds is the Switch balance loss of its routers' logits, written out
here."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_models.hf.in_place import sparse_blocks
from moe_models.hf.in_place_balance import logits_index, use_family_balance_loss
from moe_models.models.probe import small_moe_config


def switch_balance_loss(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """E x sum_i f_i P_i over every layer's tokens: f_i the share of (token, k-th choice) routes to expert i, P_i the
    mean router probability of expert i (Switch Transformer, eq. 4-6, as Mixtral's transformers code counts it)."""
    probabilities = torch.softmax(torch.cat(logits).float(), dim=-1)  # [layers x T, E]
    chosen = probabilities.topk(top_k, dim=-1).indices
    share = torch.nn.functional.one_hot(chosen, probabilities.shape[-1]).float().mean(dim=0)  # [k, E]
    return probabilities.shape[-1] * (share * probabilities.mean(dim=0)).sum()


@pytest.mark.parametrize("model_type, index", [("granitemoe", 2), ("granitemoeshared", 2), ("granitemoehybrid", 2),
                                               ("qwen4_exp_text", 0)])
def test_the_balance_loss_is_the_switch_loss_of_the_routers(model_type, index):
    """Where transformers records no router logits: with the recorder declared, the loss the stock forward adds is
    ``router_aux_loss_coef`` x the Switch loss of the logits its routers returned (at ``index``: GraniteMoe's router
    returns (top_k_index, top_k_weights, logits), Qwen4-Exp's (logits, scores, indices))."""
    config = small_moe_config(AutoConfig.for_model(model_type))
    config.router_aux_loss_coef = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    use_family_balance_loss(model)
    routers = [block.router for block in sparse_blocks(model)]
    assert logits_index(routers[0]) == index
    seen = []
    hooks = [router.register_forward_hook(lambda module, args, out: seen.append(out[index])) for router in routers]
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(routers) >= 1
    expected = switch_balance_loss(seen, top_k=config.num_experts_per_tok)
    torch.testing.assert_close(out.aux_loss, expected)
    language = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, language + 0.5 * expected)
