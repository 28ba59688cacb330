"""torch.compile can trace the MoE layer: no graph break inside route -> dispatch -> experts -> combine at ep_size 1,
and the compiled layer computes what the eager one does."""

import pytest
import torch
import torch._dynamo
from test_grouped_layer import DIM, layer_pair

CASES = {"dropless": (2, dict(drop_tokens=False, top2_2nd_expert_sampling=False)),
         "dropless-top4": (4, dict(drop_tokens=False)),
         "capacity-top1-rts": (1, dict(drop_tokens=True, capacity_factor=0.5, use_rts=True)),
         "capacity-top2": (2, dict(drop_tokens=True, capacity_factor=0.5)),
         "capacity-top3": (3, dict(drop_tokens=True, capacity_factor=0.5))}


@pytest.mark.parametrize("case", CASES)
def test_the_layer_forward_has_no_graph_break_in_bf16(case):
    """bf16: on CPU, torch's fake kernel of _grouped_mm (what the compiler traces with) takes bf16 only."""
    top_k, settings = CASES[case]
    _, grouped = layer_pair(top_k, **settings)
    grouped = grouped.to(torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(grouped.deepspeed_moe)(torch.randn(2, 40, DIM, dtype=torch.bfloat16))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_the_compiled_layer_computes_the_eager_forward_and_backward():
    _, grouped = layer_pair(2, drop_tokens=True, capacity_factor=0.5)
    grouped = grouped.to(torch.bfloat16)
    x = torch.randn(2, 40, DIM, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(grouped.deepspeed_moe, backend="aot_eager", fullgraph=True)
    results = []
    for layer in (grouped.deepspeed_moe, compiled):
        x_grad = x.clone().requires_grad_(True)
        out = layer(x_grad)
        (out.float().sum() + grouped.deepspeed_moe.l_aux).backward()
        results.append((out.detach(), x_grad.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)  # the same operations, in bf16
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-2, atol=1e-2)
