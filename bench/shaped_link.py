"""Per-route against node-once dispatch across a shaped link: step time measured on 2 hosts x 2 ranks of the network
namespace cluster (tests/netns_cluster.py), beside the plan's prediction for the same flags.

    python bench/shaped_link.py [--rates 200mbit,1gbit] [--repeats 3] [--steps 12] [--out FOLDER]

For each link rate, one cluster of 2 hosts, every link shaped to the rate (tc tbf, no delay); for each model (E8
top-2, and E32 top-8 of experts a quarter as wide: the same active FLOPs) without and with node-limited routing
(--expert_groups 2 --max_groups_per_token 1: a group is one host's experts), ep_size 4 through the no-ssh launcher
(launch/multi_node_no_ssh.sh, one per host) with --dispatcher per_route and node_once in turn, ``repeats`` pairs,
the first dispatcher of a pair alternating. A run's step time is the median of its logged intervals after the
first; its bytes across nodes are rank 0's per step (all_to_all_bytes_across_nodes summed over the layers).

The plan: a cluster file per rate (OUT/shaped_RATE.json), 2 devices per node, whose compute rate and optimizer
bandwidth are measured (bench/step_time_check.py's node_rates) with 4 ranks at once, as the cluster runs them on
this machine's cores; its in-node link is gloo's loopback all-to-all (step_time_check's calibration) and its
inter-node bandwidth the shaped rate shared by the host's 2 ranks; latency per exchange, in and across nodes, is
what one small all-to-all costs while the ranks train (the median of 3 tries, at least the latency between
idle ranks). Then `train.py --plan --plan_cluster FILE --plan_nodes 2`
with each run's flags. OMP_NUM_THREADS is 1 per rank. Needs root (the namespaces).
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

LAYERS = 4
MODEL = dict(model_type="llama", vocab_size=257, hidden_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=256,
             eos_token_id=256, pad_token_id=256)
BASE = ["--ep_size", "4", "--block_size", "128", "--per_device_train_batch_size", "4", "--synthetic_examples", "1000",
        "--drop_tokens", "false", "--eval_steps", "0", "--warmup_steps", "1", "--disable_tqdm",
        "--expert_init", "random", "--prove_conversion", "false"]
# (expert width, flags): fresh experts, as wide as the model config's FFN; E32's a quarter as wide, 4 x the routes
MODELS = {"E8 top-2": (256, ["--num_experts", "8", "--top_k", "2"]),
          "E32 top-8": (64, ["--num_experts", "32", "--top_k", "8"])}
ROUTING = {"": [], "M=1": ["--expert_groups", "2", "--max_groups_per_token", "1"]}
DISPATCHERS = ("per_route", "node_once")


def run_once(cluster, flags: list[str], out: Path, model: Path, steps: int, port: int) -> dict:
    """One training run on the cluster's hosts: its median step time and rank 0's bytes per step."""
    out.parent.mkdir(parents=True, exist_ok=True)
    hostfile = out.parent / "hostfile"
    hostfile.write_text("".join(f"host{h.index} slots=2\n" for h in cluster.hosts))
    command = [*BASE, *flags, "--model_config", str(model), "--max_steps", str(steps),
               "--logging_steps", "1", "--overwrite_output_dir", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(host.command(["launch/multi_node_no_ssh.sh", str(hostfile), str(host.index),
                                            cluster.master.address, *command]),
                              cwd=REPO, env={**env, "GLOO_SOCKET_IFNAME": host.interface},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for host in cluster.hosts]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError(f"run {' '.join(flags)} failed:\n" + "\n".join(o[-3000:] for o in outputs))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step_time"' in line]
    per_step = {where: statistics.mean(sum(row[f"moe/layer_{i}/all_to_all_bytes_{where}"] for i in range(LAYERS))
                                       for row in rows) for where in ("across_nodes", "in_node")}
    return {"step_time": statistics.median(row["step_time"] for row in rows[1:]), **per_step}


def cluster_file(rate: str, base: dict, out: Path) -> Path:
    """The plan's cluster for this machine with the inter-node link at ``rate`` (tc units), shared by 2 ranks."""
    bits = float(rate[:-4]) * {"m": 1e6, "g": 1e9}[rate[-4]]
    path = out / f"shaped_{rate}.json"
    path.write_text(json.dumps({**base, "inter_node_bandwidth": bits / 8 / 2,
                                "source": base["source"] + f"; inter-node link tc tbf {rate}, 2 ranks per host"}))
    return path


def calibrated(out: Path) -> dict:
    """This machine's rates as the cluster uses them (module docstring), cached in OUT/calibration.json."""
    cached = out / "calibration.json"
    if cached.exists():
        return json.loads(cached.read_text())
    import torch.multiprocessing as mp
    from step_time_check import _collectives, _exchange_in_training, fit, free_ports, node_rates
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_collectives, args=(free_ports(1)[0], queue), nprocs=2, start_method="spawn")
    fits = queue.get()
    idle_latency, all_to_all_bandwidth = fit([(size / 2, t) for size, t in fits["all_to_all"]])
    bandwidth_in_node = min(fit(fits["all_reduce"])[1], all_to_all_bandwidth)
    tries = []
    for _ in range(3):  # a difference of two step times: noisy beside the machine's other load
        mp.start_processes(_exchange_in_training, args=(free_ports(1)[0], queue), nprocs=2, start_method="spawn")
        tries.append(queue.get())
    latency = max(statistics.median(tries), idle_latency)
    rate, bandwidth = node_rates(4)
    base = dict(devices_per_node=2, memory_gib=5, peak_flops=rate, matmul_flops=rate, memory_bandwidth=bandwidth,
                intra_node_bandwidth=bandwidth_in_node, intra_node_latency=latency,
                inter_node_bandwidth=bandwidth_in_node, inter_node_latency=latency, bf16=False,
                source=f"bench/shaped_link.py on this machine, {time.strftime('%Y-%m-%d')}: 4 ranks at once, dense "
                       f"training {rate / 1e9:.2f} GFLOP/s, optimizer step {bandwidth / 1e9:.2f} GB/s; gloo in node "
                       f"{bandwidth_in_node / 1e9:.2f} GB/s; per exchange in training "
                       f"{', '.join(f'{1e6 * t:.0f}' for t in tries)} us (median, at least the idle "
                       f"{1e6 * idle_latency:.0f} us: {1e6 * latency:.0f} us)")
    cached.write_text(json.dumps(base, indent=1))
    return base


def planned(cluster: Path, flags: list[str], out: Path, model: Path) -> dict:
    """`train.py --plan --plan_cluster cluster --plan_nodes 2` for ``flags``: step time and bytes across nodes."""
    from moe_models.train import main as train
    plan_dir = out / "plan"
    train([*BASE, *flags, "--model_config", str(model), "--plan", "--plan_cluster", str(cluster), "--plan_nodes", "2",
           "--output_dir", str(plan_dir)])
    plan = json.loads((plan_dir / "plan.json").read_text())
    return {"step_time": plan["step_time"]["step_time"], "across_nodes": plan["all_to_all_bytes_across_nodes"],
            "in_node": plan["all_to_all_bytes_in_node"]}


def table(results: list[dict]) -> str:
    """One line per (rate, model, routing): each dispatcher's median measured and predicted step time, the median
    per-pair ratio node_once / per_route, and measured / planned bytes across nodes."""
    lines = ["| link | model | routing | per_route ms (plan) | node_once ms (plan) | node_once / per_route "
             "measured (plan) | MB across / step per_route, node_once (run / plan) |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        cells = []
        for dispatcher in DISPATCHERS:
            runs = result[dispatcher]
            cells.append(f"{1e3 * statistics.median(r['step_time'] for r in runs):.0f} "
                         f"({1e3 * result['plan'][dispatcher]['step_time']:.0f})")
        ratios = [b["step_time"] / a["step_time"] for a, b in zip(result["per_route"], result["node_once"])]
        plan_ratio = result["plan"]["node_once"]["step_time"] / result["plan"]["per_route"]["step_time"]
        moved = ", ".join(f"{statistics.mean(r['across_nodes'] for r in result[d]) / 1e6:.2f} "
                          f"({statistics.mean(r['across_nodes'] for r in result[d]) / result['plan'][d]['across_nodes']:.2f})"
                          for d in DISPATCHERS)
        cells.append(f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] ({plan_ratio:.2f})")
        lines.append(f"| {result['rate']} | {result['model']} | {result['routing'] or 'all groups'} | "
                     + " | ".join(cells) + f" | {moved} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="200mbit,1gbit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "shaped_link")
    args = parser.parse_args()
    from netns_cluster import cluster
    from step_time_check import free_ports
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base = calibrated(args.out)
    print(f"calibrated: {base['source']} ({time.monotonic() - started:.0f} s)", flush=True)
    models = {}
    for model in args.models.split(","):
        width, _ = MODELS[model]
        models[model] = args.out / f"model_f{width}.json"
        models[model].write_text(json.dumps({**MODEL, "intermediate_size": width}))
    rates = args.rates.split(",")
    results = []
    with cluster(2, rates[0]) as hosts:
        for rate in rates:
            hosts.shape(rate)
            plan_cluster = cluster_file(rate, base, args.out)
            for model, model_json in models.items():
                for routing, routing_flags in ROUTING.items():
                    name = f"{rate} {model} {routing}".strip().replace(" ", "_")
                    result = {"rate": rate, "model": model, "routing": routing, "plan": {}}

                    def flags(dispatcher: str) -> list[str]:
                        return [*MODELS[model][1], *routing_flags, "--dispatcher", dispatcher]
                    for repeat in range(args.repeats):
                        for dispatcher in DISPATCHERS[::1 if repeat % 2 == 0 else -1]:
                            t0 = time.monotonic()
                            run = run_once(hosts, flags(dispatcher), args.out / name / f"{dispatcher}_{repeat}",
                                           model_json, args.steps, free_ports(1)[0])
                            result.setdefault(dispatcher, []).append(run)
                            print(f"{name} {dispatcher} #{repeat}: {run} ({time.monotonic() - t0:.0f} s)", flush=True)
                    for dispatcher in DISPATCHERS:
                        result["plan"][dispatcher] = planned(plan_cluster, flags(dispatcher), args.out / name,
                                                             model_json)
                    results.append(result)
                    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"bench wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
