"""Run under the deepspeed launcher by tests/test_distributed.py: builds the run exactly as train.py
does, takes a few optimizer steps, and writes what the tests compare to OUTPUT_DIR/probe_rank{R}.pt:

- the initial weights of every local expert, keyed by (layer, global expert id, parameter name);
- the reduced gradient of every local expert parameter, router and shared-expert parameter after the first backward;
- the loss of every step as logged (mean over ranks);
- the number of parameters this rank holds;
- the host syncs of the second step's forward and backward (tests/host_syncs.py) and the number of MoE layers;
- the tokens of its batches that are not padding, and those the first MoE layer routed;
then it saves a checkpoint like train.py.

Usage: deepspeed --num_gpus N tests/scripts/probe.py --steps K <train.py flags>
"""

import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_syncs import HostSyncs  # noqa: E402

from moe_models.moe.layer import moe_layers_of  # noqa: E402
from moe_models.run.cli import parse_args  # noqa: E402
from moe_models.run.distributed import all_reduce_sum  # noqa: E402
from moe_models.data.batches import model_inputs  # noqa: E402
from moe_models.training.loop import lm_loss_of  # noqa: E402
from train import build  # noqa: E402


def expert_tensors(layers, read) -> dict:
    return {(layer_index, global_id, name): tensor.detach().clone()
            for layer_index, layer in enumerate(layers)
            for local, global_id in zip(layer.local_expert_weights(of=read), layer.global_expert_ids())
            for name, tensor in local.items()}


def shared_expert_grads(layers) -> dict:
    """(layer, parameter name) -> the reduced gradient of each shared-expert parameter (and gate), if any."""
    return {(layer_index, name): safe_get_full_grad(param).clone()
            for layer_index, layer in enumerate(layers) for name, param in layer.named_parameters()
            if name.startswith("shared_expert")}


def main() -> None:
    args = sys.argv[1:]
    steps = int(args[args.index("--steps") + 1])
    del args[args.index("--steps"):args.index("--steps") + 2]
    cfg = parse_args(args)
    world, trainer = build(cfg)
    engine, layers = trainer.engine, moe_layers_of(trainer.engine.module)
    record = {"initial": expert_tensors(layers, lambda p: p), "losses": [],
              "parameters": sum(p.numel() for p in engine.module.parameters()), "moe_layers": len(layers),
              "real_tokens": 0}
    for step in range(steps):
        batch = next(trainer.batches)
        record["real_tokens"] += int(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).sum())
        trainer.moe_layers.ignore_padding(batch.get("attention_mask"), world.device)
        inputs = model_inputs(batch, world.device)
        with HostSyncs() as syncs:
            lm_loss = lm_loss_of(engine, inputs)
            engine.backward(lm_loss + trainer.moe_layers.router_loss(lm_loss)[0])
        if step == 1:
            record["host_syncs"] = [(s.op, s.where, s.ours) for s in syncs.found]
        if step == 0:
            record["grads"] = expert_tensors(layers, safe_get_full_grad)
            record["router_grads"] = [safe_get_full_grad(layer.router.wg.weight).clone() for layer in layers]
            record["shared_grads"] = shared_expert_grads(layers)
        engine.step()
        trainer.moe_layers.after_optimizer_step(engine.was_step_applied())
        mean_loss = all_reduce_sum(lm_loss.detach().clone()) / world.world_size
        record["losses"].append(mean_loss.item())
    record["routed_tokens"] = int(layers[0].routing.sums(world.device).tokens)
    trainer.state.step = steps
    trainer.save()
    torch.save(record, Path(cfg.train.output_dir) / f"probe_rank{world.rank}.pt")


if __name__ == "__main__":
    main()
