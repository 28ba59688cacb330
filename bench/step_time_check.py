"""The plan's step-time model (moe_models/training/step_time.py) against measured training steps on this machine.

    python bench/step_time_check.py [--steps 8] [--out FOLDER]

1. Calibrate: the training rate of the dense model of the same shapes (forward + backward, by the MFU formula; the
   cluster file's matmul_flops), the bandwidth a real DeepSpeed ZeRO-1 optimizer step reaches over 16 M parameters
   in large tensors, as stacked experts hold theirs (the file's memory_bandwidth: on a CPU far below a large
   copy's), gloo's all-reduce and all-to-all between 2 ranks (time = latency + bytes / bandwidth, fitted over
   64 KiB .. 16 MiB), and what one small all-to-all costs while both ranks train (the files' latency). The two
   rates are measured by one rank alone and by two ranks at once (the cores share the memory bus), giving a
   cluster file for --plan_cluster per node size: ``OUT/this_machine_1.json`` and ``OUT/this_machine_2.json``.
2. For each configuration (ep_size 1 and 2, 8 and 32 experts, top-2 and top-4, with and without activation
   checkpointing): the plan's predicted step time for the file of its rank count, then a real run through
   train.py (the deepspeed launcher for 2 ranks) whose median step_time over the logged intervals after the first
   is the measurement.
3. A table: predicted, measured, predicted / measured, and the model's biggest part.

OMP_NUM_THREADS is 1 per rank (the calibration uses the same), so the ranks do not compete for the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = dict(model_type="llama", vocab_size=257, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
             bos_token_id=256, eos_token_id=256, pad_token_id=256)
BASE = ["--block_size", "128", "--per_device_train_batch_size", "4", "--synthetic_examples", "600",
        "--drop_tokens", "false", "--eval_steps", "0", "--warmup_steps", "1", "--disable_tqdm"]
CONFIGS = [  # (name, ranks, flags)
    ("ep1 E8 top2", 1, ["--num_experts", "8", "--top_k", "2"]),
    ("ep1 E8 top2 ckpt", 1, ["--num_experts", "8", "--top_k", "2", "--gradient_checkpointing"]),
    ("ep1 E32 top2", 1, ["--num_experts", "32", "--top_k", "2"]),
    ("dp2 ep1 E8 top2", 2, ["--num_experts", "8", "--top_k", "2", "--ep_size", "1"]),
    ("ep2 E8 top2", 2, ["--num_experts", "8", "--top_k", "2", "--ep_size", "2"]),
    ("ep2 E32 top2", 2, ["--num_experts", "32", "--top_k", "2", "--ep_size", "2"]),
    ("ep2 E8 top4", 2, ["--num_experts", "8", "--top_k", "4", "--ep_size", "2"]),
    ("ep2 E8 top2 ckpt", 2, ["--num_experts", "8", "--top_k", "2", "--ep_size", "2", "--gradient_checkpointing"]),
]


def seconds_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def dense_model():
    from transformers import AutoConfig, AutoModelForCausalLM
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**MODEL))


def training_rate(batch: int, block: int) -> float:
    """FLOP/s of one thread training the dense model of the same shapes (forward + backward of one micro-batch, by
    the MFU formula): the sustained rate of everything a block does (GEMMs, attention, norms), which on a CPU is far
    below the rate of its large GEMMs alone."""
    from moe_models.metrics.throughput import active_parameters, attention_dims, flops_per_token
    model = dense_model()
    ids = torch.randint(0, MODEL["vocab_size"], (batch, block))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
    per_token = flops_per_token(active_parameters(model, []), *attention_dims(model.config), block)
    return batch * block * per_token / seconds_of(step, repeats=3)


class Parameters(torch.nn.Module):
    """``count`` parameters in a few large tensors, as stacked experts hold theirs, and a forward that costs nothing:
    what is left of a training step is the engine's gradient handling and the optimizer step."""

    def __init__(self, count: int, tensors: int = 8):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(count // tensors)) for _ in range(tensors))

    def forward(self, x):
        return sum((w * x).sum() for w in self.weights)


def optimizer_bandwidth(port: int, count: int = 2**24) -> float:
    """The memory bandwidth the engine's gradient handling and optimizer step reach on one rank: real DeepSpeed
    ZeRO-1 steps (the shipped zero1.json, torch's AdamW) over ``count`` parameters, less the same forward + backward
    outside the engine, over the bytes the plan counts for them (step_time.py: 32 per parameter for Adam's
    partition and 16 per local parameter for the engine's copies; one rank holds all of them). Torch's AdamW on a
    CPU makes many passes per parameter, so this is far below a large copy's bandwidth, and it is what the plan's
    optimizer part needs."""
    import deepspeed

    from moe_models.training.step_time import ADAM_BYTES_PER_PARAMETER, ENGINE_BYTES_PER_LOCAL_PARAMETER
    launcher = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
    os.environ.update(launcher)
    deepspeed.init_distributed("gloo")
    config = json.loads((REPO / "moe_models/training/ds_configs/zero1.json").read_text())
    config.pop("scheduler")
    config.update(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                  gradient_clipping=1.0, bf16={"enabled": False})
    config["optimizer"]["params"].update(lr=1e-4, weight_decay=0.1)
    model, plain = Parameters(count), Parameters(count)  # plain: outside the engine (no hooks of ZeRO's)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.ones(())

    def forward_backward():
        plain(x).backward()
        plain.zero_grad(set_to_none=True)

    def engine_step():
        engine.backward(engine(x))
        engine.step()
    extra = seconds_of(engine_step) - seconds_of(forward_backward)
    torch.distributed.destroy_process_group()
    for name in launcher:  # the runs measured next start their own ranks
        del os.environ[name]
    return count * (ADAM_BYTES_PER_PARAMETER + ENGINE_BYTES_PER_LOCAL_PARAMETER) / max(extra, 1e-6)


def _collectives(rank: int, port: int, queue) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fits = {}
    for name in ("all_reduce", "all_to_all"):
        points = []
        for size in (2**16, 2**18, 2**20, 2**22, 2**24):  # bytes per rank
            t = torch.zeros(size // 4)
            out = torch.empty_like(t)
            op = (lambda: dist.all_reduce(t)) if name == "all_reduce" else (lambda: dist.all_to_all_single(out, t))
            dist.barrier()
            points.append((size, seconds_of(op)))
        fits[name] = points
    if rank == 0:
        queue.put(fits)
    dist.destroy_process_group()


def _exchange_in_training(rank: int, port: int, queue) -> None:
    """Two ranks train the dense model at once, with and without a small all-to-all after every block's forward and
    (through autograd) backward, as the MoE layers exchange between their GEMMs: the difference per exchange is what
    one costs in training, where the other rank may be busy and gloo's thread must wait for a core."""
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    from moe_models.models.architectures import architecture_of
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = dense_model()
    blocks = architecture_of(model).blocks_of(model)
    ids = torch.randint(0, MODEL["vocab_size"], (4, 128))
    exchanging = [False]

    def exchange(module, args, output):
        if not exchanging[0]:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        sent = all_to_all_single_autograd(hidden.reshape(-1)[:64].contiguous(), [32, 32], [32, 32], dist.group.WORLD)
        hidden = hidden + 0.0 * sent.sum()
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    for block in blocks:
        block.register_forward_hook(exchange)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    times = {}
    for name in ("plain", "exchanging", "plain again", "exchanging again"):
        exchanging[0] = name.startswith("exchanging")
        dist.barrier()
        times[name] = seconds_of(step)
    extra = (times["exchanging"] + times["exchanging again"] - times["plain"] - times["plain again"]) / 2
    if rank == 0:
        queue.put(max(extra, 0.0) / (2 * len(blocks)))  # one exchange per block forward, one backward
    dist.destroy_process_group()


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of time = latency + bytes / bandwidth, least squares."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return max(mean_y - slope * mean_x, 1e-6), 1 / slope


def free_ports(n: int) -> list[int]:
    import socket
    ports = []
    for _ in range(n):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    return ports


def _rates(rank: int, ports: list[int], queue) -> None:
    torch.set_num_threads(1)
    queue.put((training_rate(4, 128), optimizer_bandwidth(ports[rank])))


def node_rates(ranks: int) -> tuple[float, float]:
    """(training FLOP/s, optimizer bandwidth) of one rank while ``ranks`` ranks (one thread each) measure at once:
    the cores of a CPU share its caches and memory bus, so each rate depends on how many ranks work beside it (each
    GPU has its own memory; there the rates do not). The mean over the ranks."""
    import torch.multiprocessing as mp
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rates, args=(free_ports(ranks), queue), nprocs=ranks, start_method="spawn")
    rates = [queue.get() for _ in range(ranks)]
    return statistics.mean(r for r, _ in rates), statistics.mean(b for _, b in rates)


def calibrate(out: Path) -> dict[int, Path]:
    """A cluster file per node size: ``this_machine_1.json`` (one rank, the other core idle) and
    ``this_machine_2.json`` (two ranks busy at once), each with the rates measured that way."""
    import torch.multiprocessing as mp
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_collectives, args=(free_ports(1)[0], queue), nprocs=2, start_method="spawn")
    fits = queue.get()
    # An all-reduce moves 2 (n - 1) / n of its bytes per rank over the link (a ring): at n = 2, all of them; an
    # all-to-all of B bytes per rank sends B / 2 to the other rank.
    reduce_latency, reduce_bw = fit(fits["all_reduce"])
    a2a_latency, a2a_bw = fit([(size / 2, t) for size, t in fits["all_to_all"]])
    mp.start_processes(_exchange_in_training, args=(free_ports(1)[0], queue), nprocs=2, start_method="spawn")
    in_training = queue.get()
    links = (f"all-reduce {reduce_bw / 1e9:.2f} GB/s + {1e6 * reduce_latency:.0f} us, all-to-all "
             f"{a2a_bw / 1e9:.2f} GB/s + {1e6 * a2a_latency:.0f} us idle, {1e6 * in_training:.0f} us in training")
    files = {}
    for ranks in (1, 2):
        rate, bandwidth = node_rates(ranks)
        cluster = dict(devices_per_node=ranks, memory_gib=12, peak_flops=rate, matmul_flops=rate,
                       memory_bandwidth=bandwidth, intra_node_bandwidth=min(reduce_bw, a2a_bw),
                       intra_node_latency=in_training,
                       inter_node_bandwidth=min(reduce_bw, a2a_bw),
                       inter_node_latency=in_training, bf16=False,
                       source=f"bench/step_time_check.py on this machine, {time.strftime('%Y-%m-%d')}, {ranks} "
                       f"rank(s) at once: dense training {rate / 1e9:.1f} GFLOP/s, optimizer step "
                       f"{bandwidth / 1e9:.2f} GB/s; {links}")
        files[ranks] = out / f"this_machine_{ranks}.json"
        files[ranks].write_text(json.dumps(cluster, indent=1))
        print(f"calibrated: {cluster['source']}", flush=True)
    return files


def predicted(cluster_file: Path, ranks: int, flags: list[str], out: Path) -> dict:
    """The plan's step time (``StepTime.as_dict``) of the configuration on ``ranks`` ranks of the calibrated node."""
    from moe_models.run.cli import parse_args
    from moe_models.training.clusters import resolve_cluster
    from moe_models.training.preflight import ModelShape, Setup, plan
    from moe_models.training.step_time import predict
    from moe_models.training.validate import validate
    cfg = parse_args([*BASE, *flags, "--model_config", str(out / "model.json"), "--plan", "--output_dir",
                      str(out / "plan")])
    ds_config = validate(cfg, world_size=ranks)
    result = plan(cfg, ds_config, ranks)
    return predict(ModelShape(**result["shape"]), Setup(**result["setup"]), ds_config,
                   resolve_cluster(str(cluster_file)), result["all_to_all_bytes_per_step"]).as_dict()


def measured(ranks: int, flags: list[str], out: Path, steps: int) -> float:
    run = out / "runs" / "_".join(flags).replace("--", "")
    command = [*BASE, *flags, "--model_config", str(out / "model.json"), "--max_steps", str(steps), "--logging_steps",
               "2", "--overwrite_output_dir", "--output_dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if ranks == 1:
        subprocess.run([sys.executable, "train.py", *command], cwd=REPO, env=env, check=True, capture_output=True)
    else:
        subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "train.py",
                        *command], cwd=REPO, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [row["step_time"] for row in rows if "step_time" in row][1:]  # the first interval holds the warm-up
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "step_time_check")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.json").write_text(json.dumps(MODEL))
    cluster_files = calibrate(args.out)
    print(f"{'configuration':<20} {'predicted ms':>13} {'measured ms':>12} {'pred/meas':>10}  biggest part")
    for name, ranks, flags in CONFIGS:
        step = predicted(cluster_files[ranks], ranks, flags, args.out)
        seconds = measured(ranks, flags, args.out, args.steps)
        biggest = max(step["shares"], key=step["shares"].get)
        print(f"{name:<20} {1e3 * step['step_time']:13.1f} {1e3 * seconds:12.1f} {step['step_time'] / seconds:10.2f}"
              f"  {biggest} {100 * step['shares'][biggest]:.0f}%", flush=True)


if __name__ == "__main__":
    main()
