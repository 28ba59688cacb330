"""Experts swapped in place at ep_size 2 give the ep_size 1 logits and gradients; run under the deepspeed launcher with
2 CPU ranks by tests/hf/test_in_place_distributed.py.

Every rank builds the same probe of each family (the same weights), and takes its own batch, padded (a different
number of pad tokens per rank, left out of routing by MoELayers.ignore_padding, of the loss by its targets). The
reference is the probe swapped at ep_size 1 on this rank alone: its logits on this rank's batch, its router and
other gradients from this rank's batch, and its expert gradients from both ranks' batches (at ep_size 2 an expert's
rows come from every rank of its group, and its gradient with them), and no pad token routed. Prints
`OK <family> rank <r>` per family; an assertion fails otherwise. Then DeepSpeed engines (ZeRO-2) at ep_size 1 and 2 take four steps: the same losses and weights
(`TRAINED <family> rank <r>`).

Usage: deepspeed --num_gpus 2 tests/scripts/in_place_ep.py OUTPUT_DIR qwen3_moe deepseek_v3 llama4_text longcat_flash aria_text
"""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from moe_models.hf.in_place import fused_experts_of, swap_experts  # noqa: E402
from moe_models.hf.in_place_proof import probe_model  # noqa: E402
from moe_models.models.probe import small_moe_config  # noqa: E402
from moe_models.moe.model_layers import MoELayers  # noqa: E402
from moe_models.moe.parallel import make_expert_parallel_groups  # noqa: E402
from moe_models.run.cli import parse_args  # noqa: E402
from moe_models.run.distributed import init_world  # noqa: E402
from moe_models.training.ds_config import build_deepspeed_config  # noqa: E402
from moe_models.training.engine import build_engine  # noqa: E402

EP = 2
TOLERANCE = 1e-4  # relative to each tensor's largest magnitude (fp32)


def batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(100 + rank))


def padding(rank: int) -> torch.Tensor:
    """The attention mask of rank r's padded batch in ``check``: its first row ends in 4 + 4r pad tokens, so the
    ranks route different numbers of real tokens (moe/padding.py)."""
    return torch.tensor([[1] * (20 - 4 * rank) + [0] * (4 + 4 * rank), [1] * 24])


def loss_of(model, ids: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """The loss over the real tokens' targets of a batch with attention mask ``mask_BS``, and its logits (0 at the
    padding)."""
    MoELayers(model).ignore_padding(mask_BS, torch.device("cpu"))
    logits = model(input_ids=ids, attention_mask=mask_BS, use_cache=False).logits.float()
    real_BS = mask_BS.bool()
    targets = torch.where(real_BS[:, 1:], ids[:, 1:], -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
    return loss, torch.where(real_BS.unsqueeze(-1), logits, 0.0).detach()


def close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item() or 1.0
    difference = (got - expected).abs().max().item() / scale
    assert difference <= TOLERANCE, f"rank {dist.get_rank()}: {what} differs by {difference:.2e} of its largest"


def check(model_type: str) -> None:
    config = AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model_class = type(AutoModelForCausalLM.from_config(small_moe_config(config)))
    rank = dist.get_rank()
    stock = probe_model(model_class, config)
    one, two = copy.deepcopy(stock), copy.deepcopy(stock)
    swap_experts(one)                # ep_size 1: every expert here
    swap_experts(two, ep_size=EP)    # ep_size 2: this rank's half, the rows by all-to-all

    loss_two, logits_two = loss_of(two, batch(rank), padding(rank))
    loss_two.backward()
    for layer in fused_experts_of(two):  # the padding was not routed: each rank sends its real tokens only
        assert (layer.last_topk_ids_TK.view(2, 24, -1)[~padding(rank).bool()] == -1).all()
    loss_one, logits_one = loss_of(one, batch(rank), padding(rank))
    close(logits_two, logits_one, f"{model_type}: logits")
    own = {name: p.grad.clone() for name, p in one.named_parameters() if p.grad is not None}
    one.zero_grad()
    sum(loss_of(one, batch(r), padding(r))[0] for r in range(EP)).backward()  # the experts' rows from both ranks

    ones = dict(one.named_parameters())
    for name, param in two.named_parameters():
        if ".experts.deepspeed_moe." in name or name in own:
            assert param.grad is not None, f"rank {rank}: {model_type}: {name} got no gradient"
        if ".experts.deepspeed_moe." in name:
            module = next(m for m in fused_experts_of(two) if name.startswith(_path(two, m)))
            expected = ones[name].grad[module.global_expert_ids().start:module.global_expert_ids().stop]
            close(param.grad, expected, f"{model_type}: the gradient of {name} (experts {module.global_expert_ids()})")
        elif name in own:
            close(param.grad, own[name], f"{model_type}: the gradient of {name}")
    print(f"OK {model_type} rank {rank}", flush=True)


def train(model_type: str, output_dir: str) -> None:
    """Four ZeRO-2 steps of DeepSpeed engines at ep_size 1 and 2 (each rank its own batch): the same losses, and
    the same experts after them (the schedule warms up from 0: the weights move from the third step; rank r's
    ep_size 2 experts are rows of the ep_size 1 tensors)."""
    config = AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model_class = type(AutoModelForCausalLM.from_config(small_moe_config(config)))
    cfg = parse_args(["--output_dir", output_dir, "--deepspeed", "zero2", "--warmup_steps", "1",
                      "--learning_rate", "3e-3", "--per_device_train_batch_size", "2"])
    ds_config = build_deepspeed_config(cfg, world_size=dist.get_world_size())
    losses, engines = {}, {}
    for ep in (1, EP):
        model = probe_model(model_class, config).train()
        swap_experts(model, ep_size=ep)
        engines[ep] = build_engine(model, ds_config, weight_decay=0.0)
        losses[ep] = []
        for _ in range(4):
            loss = engines[ep](input_ids=batch(dist.get_rank()), labels=batch(dist.get_rank()), use_cache=False).loss
            engines[ep].backward(loss)
            engines[ep].step()
            losses[ep].append(loss.item())
    assert losses[1] == pytest_approx(losses[EP]), f"rank {dist.get_rank()}: {model_type}: losses {losses}"
    assert losses[EP][-1] < losses[EP][0], f"rank {dist.get_rank()}: {model_type}: no step moved the loss {losses}"
    ones = dict(engines[1].module.named_parameters())
    for name, param in engines[EP].module.named_parameters():
        expected = ones[name]
        if ".experts.deepspeed_moe." in name:
            module = next(m for m in fused_experts_of(engines[EP].module) if name.startswith(_path(engines[EP].module,
                                                                                                   m)))
            expected = expected[module.global_expert_ids().start:module.global_expert_ids().stop]
        close(param.detach(), expected.detach(), f"{model_type}: {name} after four steps")
    print(f"TRAINED {model_type} rank {dist.get_rank()} losses {losses[EP]}", flush=True)
    for engine in engines.values():
        engine.destroy()


def pytest_approx(values: list[float]) -> list:
    return [Approx(v) for v in values]


class Approx(float):
    def __eq__(self, other) -> bool:
        return abs(float(self) - other) <= 1e-5 * max(abs(float(self)), 1.0)


def _path(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


if __name__ == "__main__":
    init_world()
    make_expert_parallel_groups(EP)
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    output_dir, families = args[0], args[1:]
    for family in families:
        check(family)
        train(family, output_dir)
