"""No hidden host syncs: the MoE layer's training forward and backward, a training step and an eval, recorded on CPU
by tests/host_syncs.py (what a GPU run would wait for). docs/performance.md lists what remains and why."""

import pytest
import torch
from helpers import tiny_model
from host_syncs import HostSyncs
from test_grouped_layer import CAPACITY_CASES, DIM, layer_pair

import train
from moe_models import MoEConfig, convert_to_moe
from moe_models.moe.model_layers import MoELayers
from moe_models.run.cli import parse_args

LAYER_CASES = {**{f"dropless-top{k}": (k, dict(drop_tokens=False, top2_2nd_expert_sampling=True)) for k in (1, 2, 4)},
               "dropless-rsample": (1, dict(drop_tokens=False, noisy_gate_policy="RSample")),
               **{f"capacity-{name}": (k, dict(drop_tokens=True, **{"min_capacity": 1, **settings}))
                  for name, (k, settings, _) in CAPACITY_CASES.items()}}


def forward_backward(layer, x):
    out, l_aux, _ = layer(x)
    (out.sum() + l_aux).backward()


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_training_forward_and_backward_make_no_host_sync(case):
    top_k, settings = LAYER_CASES[case]
    _, grouped = layer_pair(top_k, **settings)
    x = torch.randn(2, 40, DIM, requires_grad=True)
    forward_backward(grouped, x)  # the first call makes DeepSpeed's cached noise samplers, which check on the host
    with HostSyncs() as syncs:
        forward_backward(grouped, x)
    assert syncs.found == [], syncs.report()


def test_the_stock_gate_with_capacity_syncs_where_ours_does_not():
    """The recorder sees what it should: DeepSpeed's own gating reads its capacity to the host."""
    stock, _ = layer_pair(2, drop_tokens=True, capacity_factor=0.5, min_capacity=1)
    x = torch.randn(2, 40, DIM)
    with HostSyncs() as syncs:
        stock(x)
    assert syncs.libraries and all(s.where.startswith("deepspeed/moe/sharded_moe.py") for s in syncs.found)


@pytest.mark.parametrize("moe", [dict(drop_tokens=False, num_shared_experts=1, shared_expert_gate=True,
                                      router_z_loss_coef=0.01),
                                 dict(drop_tokens=True, capacity_factor=1.0, score_function="sigmoid",
                                      router_bias_update_rate=0.001, aux_loss_type="sequence")])
def test_model_training_forward_and_backward_with_the_router_loss_make_no_host_sync(moe):
    model = convert_to_moe(tiny_model().train(), MoEConfig(num_experts=4, top_k=2, **moe))
    step = MoELayers(model)
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))

    def train_step():
        loss = model(input_ids=ids, labels=ids).loss
        (loss + step.router_loss(loss)[0]).backward()
        step.after_optimizer_step(applied=True)

    train_step()
    with HostSyncs() as syncs:
        train_step()
    assert syncs.found == [], syncs.report()


# What a training step may still read, by the library (docs/performance.md#host-syncs): DeepSpeed's ZeRO 1/2 test of
# the gradient norm per parameter group, torch.optim's step counts (host tensors on a GPU too), the DataLoader's
# seed and the DistributedSampler's order (host tensors).
LIBRARY_READS = ("deepspeed/runtime/utils.py", "torch/optim/optimizer.py", "torch/utils/data/")


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_a_step_reads_the_host_only_at_logging_and_an_eval_reads_once_per_kind(stage, world, tmp_path):
    """logging_steps 3 over 4 steps: steps 1, 3 and 4 log, step 2 does not. ZeRO 0's non-finite guard reads one flag
    per step; ZeRO 1/2 steps read nothing of ours. An eval reads its sums once, whatever the layers and batches."""
    cfg = parse_args(["--num_experts", "4", "--synthetic_examples", "200", "--block_size", "32", "--eval_steps", "0",
                      "--max_eval_batches", "2", "--disable_tqdm", "--per_device_train_batch_size", "2",
                      "--logging_steps", "3", "--max_steps", "4", "--save_steps", "0", "--deepspeed", stage,
                      "--expert_init", "copy_noise", "--output_dir", str(tmp_path)])
    _, trainer = train.build(cfg)
    syncs = HostSyncs()
    labelled(trainer, syncs, "train_step", lambda: f"step {trainer.state.step + 1}")
    labelled(trainer, syncs, "log_training_row", lambda: "logging")
    labelled(trainer, syncs, "evaluate", lambda: "eval")
    with syncs:
        trainer.train()
    guard = [("_local_scalar_dense", "moe_models/training/nonfinite.py:53")] if stage == "zero0" else []
    for step in (2, 3):
        ours = syncs.counts(ours=True, label=f"step {step}")
        assert sorted(ours) == guard and sum(ours.values()) == len(guard), syncs.report(f"step {step}")
    assert all(s.where.startswith(LIBRARY_READS) for s in syncs.labelled("step 2") if not s.ours)
    assert syncs.counts(label="after step 2") == {}, "a step that does not log reads nothing after it either"
    logging = [where.split(":")[0] for _, where in syncs.counts(ours=True, label="logging")]
    assert "moe_models/run/distributed.py" in logging  # the interval's one all-reduce comes to the host here
    assert sum(syncs.counts(ours=True, label="logging").values()) <= 3 * 3  # <= 3 reads per logging step
    eval_reads = syncs.counts(ours=True, label="eval")
    assert sum(eval_reads.values()) == 3, syncs.report("eval")  # eval sums, routes per domain, expert similarity


def labelled(trainer, syncs: HostSyncs, method: str, label):
    """Label what ``trainer.method`` and what follows it until the next labelled call records."""
    original = getattr(trainer, method)

    def call(*args):
        syncs.label = label()
        result = original(*args)
        syncs.label = f"after {syncs.label}"
        return result
    setattr(trainer, method, call)
