"""Run under the deepspeed launcher by tests/training/test_plan.py: builds the run exactly as train.py does, takes
one optimizer step and writes to OUTPUT_DIR/plan_check_rank{R}.json what the plan predicts for this rank and what
the live engine holds: the bytes of the module's parameters (weights), of the gradients after the backward (the
parameters' .grad, and ZeRO 1/2's gradient partitions), and of the optimizer's tensors after the step (its states
and ZeRO's fp32 master partitions), each storage counted once and the module's own parameters left out of the last.

Usage: deepspeed --num_gpus N tests/scripts/plan_check.py <train.py flags>
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moe_models.run.cli import parse_args  # noqa: E402
from moe_models.training.preflight import plan  # noqa: E402
from moe_models.training.ds_config import build_deepspeed_config  # noqa: E402
from train import build  # noqa: E402


def tensors_in(obj, seen: set, depth: int = 0):
    """Every tensor reachable from ``obj`` through lists, tuples, dicts and DeepSpeed/torch optimizer objects."""
    if depth > 8 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value, seen, depth + 1)


def storage_bytes(tensors, exclude: set) -> int:
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    cfg = parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    world, trainer = build(cfg)
    engine = trainer.engine
    predicted = plan(cfg, build_deepspeed_config(cfg, world.world_size), world.world_size)["bytes_per_rank"]
    params = list(engine.module.parameters())
    weight_storages = {p.untyped_storage().data_ptr() for p in params}
    input_ids = next(trainer.batches)["input_ids"].to(world.device)
    engine.backward(engine(input_ids=input_ids, labels=input_ids).loss)
    optimizer = engine.optimizer
    gradient_tensors = [p.grad for p in params if p.grad is not None]
    gradient_tensors += list(tensors_in(getattr(optimizer, "averaged_gradients", {}), set()))
    gradients = storage_bytes(gradient_tensors, exclude=set())
    engine.step()
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    state_tensors = list(tensors_in(inner.state, set()))
    state_tensors += list(tensors_in(getattr(optimizer, "single_partition_of_fp32_groups", []), set()))
    state_tensors += list(tensors_in(getattr(optimizer, "fp32_groups", []), set()))  # bf16 at stage 0: the master
    held = {"weights": sum(p.numel() * p.element_size() for p in params), "gradients": gradients,
            "optimizer_states": storage_bytes([t for t in state_tensors if t.dim() > 0], exclude=weight_storages)}
    out = Path(cfg.train.output_dir) / f"plan_check_rank{world.rank}.json"
    out.write_text(json.dumps({"predicted": predicted, "held": held}))


if __name__ == "__main__":
    main()
