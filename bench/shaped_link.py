"""Per-route against node-once dispatch across a shaped link: step time measured on 2 hosts x 2 ranks of the network
namespace cluster (tests/netns_cluster.py), beside the plan's prediction for the same flags.

    python bench/shaped_link.py [--rates 200mbit,1gbit] [--repeats 3] [--steps 6] [--out FOLDER]
    python bench/shaped_link.py --tabulate A/results.json B/results.json [--out FOLDER]   (plan and tabulate only)

For each link rate, one cluster of 2 hosts, every link shaped to the rate (tc tbf, no delay); for each model (E8
top-2, and E32 top-8 of experts a quarter as wide: the same active FLOPs) without and with node-limited routing
(--expert_groups 2 --max_groups_per_token 1: a group is one host's experts), ep_size 4 through the no-ssh launcher
(launch/multi_node_no_ssh.sh, one per host) with --dispatcher per_route and node_once in turn, ``repeats`` pairs,
the first dispatcher of a pair alternating (the machine's other load hits both). A run's step time is the median
of its logged steps after the first; its bytes across nodes are rank 0's per step (all_to_all_bytes_across_nodes
summed over the layers).

The plan: a cluster file per rate (OUT/shaped_RATE.json), 2 devices per node, whose compute rate and optimizer
bandwidth are measured (bench/step_time_check.py's node_rates) with 4 ranks at once, as the cluster runs them on
this machine's cores; its in-node link is gloo's loopback (step_time_check's calibration), its inter-node bandwidth
the shaped rate shared by the host's 2 ranks, its latency per exchange, in and across nodes, what one small
all-to-all costs while the ranks train (the median of 3 tries, at least the idle latency); a second file
(shaped_RATE_idle.json) has the latency between idle ranks instead. Then `train.py --plan --plan_cluster FILE
--plan_nodes 2` with each run's flags. The calibration is kept in OUT/calibration.json and reused. OMP_NUM_THREADS
is 1 per rank. Needs root (the namespaces).
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


def cluster_file(rate: str, base: dict, out: Path, idle: bool = False) -> Path:
    """The plan's cluster for this machine with the inter-node link at ``rate`` (tc units), shared by 2 ranks; with
    ``idle``, the latency between idle ranks in place of the one measured in training."""
    bits = float(rate[:-4]) * {"m": 1e6, "g": 1e9}[rate[-4]]
    cluster = {key: value for key, value in base.items() if key != "idle_latency"}
    cluster.update(inter_node_bandwidth=bits / 8 / 2, source=base["source"] + f"; inter-node link tc tbf {rate}, "
                   "2 ranks per host" + ("; the idle latency" if idle else ""))
    if idle:
        cluster.update(intra_node_latency=base["idle_latency"], inter_node_latency=base["idle_latency"])
    path = out / f"shaped_{rate}{'_idle' if idle else ''}.json"
    path.write_text(json.dumps(cluster))
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
                intra_node_bandwidth=bandwidth_in_node, intra_node_latency=latency, idle_latency=idle_latency,
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
    """One line per (rate, model, routing): each dispatcher's median measured step time and the plan's (with the
    latency measured in training, and the idle one), the per-pair ratios node_once / per_route (median [lowest -
    highest]) beside the plan's, and the bytes across nodes per step of rank 0 (mean over the runs) / the plan's."""
    lines = ["| link | model | routing | per_route ms: measured, plan, plan idle | node_once ms: measured, plan, plan "
             "idle | node_once / per_route: measured [range], plan, plan idle | MB across per step: per_route, "
             "node_once (run / plan) |", "|---|---|---|---|---|---|---|"]
    for result in results:
        cells = []
        for dispatcher in DISPATCHERS:
            cells.append(", ".join([f"{1e3 * statistics.median(r['step_time'] for r in result[dispatcher]):.0f}",
                                    *(f"{1e3 * result[plan][dispatcher]['step_time']:.0f}"
                                      for plan in ("plan", "plan_idle"))]))
        ratios = [b["step_time"] / a["step_time"] for a, b in zip(result["per_route"], result["node_once"])]
        cells.append(f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}], " + ", ".join(
            f"{result[plan]['node_once']['step_time'] / result[plan]['per_route']['step_time']:.2f}"
            for plan in ("plan", "plan_idle")))
        across = {d: statistics.mean(r["across_nodes"] for r in result[d]) for d in DISPATCHERS}
        cells.append(", ".join(f"{across[d] / 1e6:.2f} ({across[d] / result['plan'][d]['across_nodes']:.2f})"
                               for d in DISPATCHERS))
        lines.append(f"| {result['rate']} | {result['model']} | {result['routing'] or 'all groups'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def tabulate(results: list[dict], base: dict, out: Path) -> str:
    """Plan every measured configuration (both latencies) and make the table."""
    for result in results:
        model = out / f"model_f{MODELS[result['model']][0]}.json"
        model.write_text(json.dumps({**MODEL, "intermediate_size": MODELS[result["model"]][0]}))
        name = f"{result['rate']} {result['model']} {result['routing']}".strip().replace(" ", "_")
        for plan, idle in (("plan", False), ("plan_idle", True)):
            cluster = cluster_file(result["rate"], base, out, idle)
            result[plan] = {d: planned(cluster, flags_of(result["model"], result["routing"], d), out / name, model)
                            for d in DISPATCHERS}
    return table(results)


def merged(results) -> list[dict]:
    """One result per (rate, model, routing): the runs of several results files for one configuration together."""
    by_key: dict[tuple, dict] = {}
    for result in results:
        key = (result["rate"], result["model"], result["routing"])
        kept = by_key.setdefault(key, {"rate": key[0], "model": key[1], "routing": key[2]})
        for dispatcher in DISPATCHERS:
            kept.setdefault(dispatcher, []).extend(result[dispatcher])
    return list(by_key.values())


def flags_of(model: str, routing: str, dispatcher: str) -> list[str]:
    return [*MODELS[model][1], *ROUTING[routing], "--dispatcher", dispatcher]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="200mbit,1gbit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "shaped_link")
    parser.add_argument("--tabulate", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="measure nothing: plan the runs of these results.json files (OUT's calibration) and "
                        "print their table, the runs of one configuration in several files together")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base = calibrated(args.out)
    print(f"calibrated: {base['source']} ({time.monotonic() - started:.0f} s)", flush=True)
    if args.tabulate:
        results = merged(result for path in args.tabulate for result in json.loads(path.read_text()))
    else:
        results = measure(args.rates.split(","), args.models.split(","), args.repeats, args.steps, args.out)
    print(tabulate(results, base, args.out))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"bench wall time {time.monotonic() - started:.0f} s")


def measure(rates: list[str], models: list[str], repeats: int, steps: int, out: Path) -> list[dict]:
    """The runs, each dispatcher ``repeats`` times in turn, per rate, model and routing (results.json as it goes)."""
    from netns_cluster import cluster
    from step_time_check import free_ports
    results = []
    with cluster(2, rates[0]) as hosts:
        for rate in rates:
            hosts.shape(rate)
            for model in models:
                model_json = out / f"model_f{MODELS[model][0]}.json"
                model_json.write_text(json.dumps({**MODEL, "intermediate_size": MODELS[model][0]}))
                for routing in ROUTING:
                    name = f"{rate} {model} {routing}".strip().replace(" ", "_")
                    result = {"rate": rate, "model": model, "routing": routing}
                    for repeat in range(repeats):
                        for dispatcher in DISPATCHERS[::1 if repeat % 2 == 0 else -1]:
                            t0 = time.monotonic()
                            run = run_once(hosts, flags_of(model, routing, dispatcher),
                                           out / name / f"{dispatcher}_{repeat}", model_json, steps, free_ports(1)[0])
                            result.setdefault(dispatcher, []).append(run)
                            print(f"{name} {dispatcher} #{repeat}: {run} ({time.monotonic() - t0:.0f} s)", flush=True)
                    results.append(result)
                    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
