"""Adaptive compute against fixed top-2 at equal training steps: eval loss against the real expert FLOPs each run
spent, on the built-in corpus or on --train_file data (docs/routing.md, adaptive compute).

    python bench/adaptive_compute.py [--settings top2,top_p_0.4,...] [--seeds 1,2] [--steps 300] [train.py flags]

Every setting is a fresh tiny-llama MoE (E = 8 real experts, dropless) trained by `python train.py` with the same
seed, data order and schedule; extra flags go to every run. Printed per setting and seed (markdown):

- eval loss at the end (the last eval);
- real experts per token: the mean over the MoE layers and the logged intervals of `real_experts_per_token`;
- real expert FLOPs per token: the sum over the MoE layers of `real_expert_flops_per_token`, mean over the logged
  intervals (they hold the same number of tokens), and its share of top-2's;
- per domain at the last eval: `real_experts_per_token/{domain}`, mean over the MoE layers, and `eval_loss/{domain}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NULLS = ["--num_null_experts", "4", "--router_bias_update_rate", "1e-3"]
SETTINGS = {
    "top2": [],
    "top_p_0.4": ["--top_p", "0.4", "--dynamic_loss_coef", "1e-2"],
    "top_p_0.6": ["--top_p", "0.6", "--dynamic_loss_coef", "1e-2"],
    "null_k1.5": [*NULLS, "--null_expert_target_real_k", "1.5"],
    "null_k1.25": [*NULLS, "--null_expert_target_real_k", "1.25"],
}
COMMON = ["--num_experts", "8", "--top_k", "2", "--drop_tokens", "false", "--eval_steps", "0", "--max_eval_batches",
          "20", "--logging_steps", "10", "--disable_tqdm", "--block_size", "64", "--per_device_train_batch_size", "8"]


def run(name: str, seed: int, steps: int, root: Path, extra: list[str]) -> dict:
    out = root / f"{name}_seed{seed}"
    if not (out / "metrics.jsonl").is_file() or not any("eval_loss" in line for line in
                                                         (out / "metrics.jsonl").read_text().splitlines()):
        command = [sys.executable, "train.py", *COMMON, "--max_steps", str(steps), "--seed", str(seed),
                   *SETTINGS[name], *extra, "--output_dir", str(out)]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return figures(out)


def figures(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    last_eval = [r for r in rows if "eval_loss" in r][-1]
    layers = sorted({key.split("/")[1] for key in train[-1] if key.startswith("moe/layer_")})
    real_k = statistics.fmean(r[f"moe/{layer}/real_experts_per_token"] for r in train for layer in layers)
    flops = statistics.fmean(sum(r[f"moe/{layer}/real_expert_flops_per_token"] for layer in layers) for r in train)
    domains = json.loads((out / "run_config.json").read_text())["resolved"]["domains"]
    by_domain = {d: statistics.fmean(last_eval[f"moe/{layer}/real_experts_per_token/{d}"] for layer in layers)
                 for d in domains if f"moe/{layers[0]}/real_experts_per_token/{d}" in last_eval}
    first_last = (train[0][f"moe/{layers[0]}/real_experts_per_token"], train[-1][f"moe/{layers[0]}/real_experts_per_token"])
    return {"eval_loss": last_eval["eval_loss"], "real_experts_per_token": real_k, "real_expert_flops": flops,
            "by_domain": by_domain, "layer0_first_last": first_last,
            "eval_loss_by_domain": {d: last_eval[f"eval_loss/{d}"] for d in domains if f"eval_loss/{d}" in last_eval}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output_dir", default="outputs/adaptive_compute")
    args, extra = parser.parse_known_args()
    names, seeds = args.settings.split(","), [int(s) for s in args.seeds.split(",")]
    results = {(name, seed): run(name, seed, args.steps, Path(args.output_dir), extra) for seed in seeds
               for name in names}
    print("\n| setting | seed | eval loss | real experts / token | real expert FLOPs / token | vs top-2 |")
    print("|---|---|---|---|---|---|")
    for (name, seed), f in results.items():
        base = results.get(("top2", seed))
        share = f"{f['real_expert_flops'] / base['real_expert_flops']:.2f}" if base else "-"
        print(f"| {name} | {seed} | {f['eval_loss']:.4f} | {f['real_experts_per_token']:.3f} "
              f"(layer 0: {f['layer0_first_last'][0]:.2f} first, {f['layer0_first_last'][1]:.2f} last) | "
              f"{f['real_expert_flops']:.4g} | {share} |")
    if len(seeds) > 1:
        print("\n| setting | eval loss, mean (min..max) | FLOPs vs top-2, mean |\n|---|---|---|")
        for name in names:
            losses = [results[name, s]["eval_loss"] for s in seeds]
            shares = [results[name, s]["real_expert_flops"] / results["top2", s]["real_expert_flops"] for s in seeds
                      if ("top2", s) in results]
            print(f"| {name} | {statistics.fmean(losses):.4f} ({min(losses):.4f}..{max(losses):.4f}) | "
                  f"{statistics.fmean(shares):.2f} |" if shares else f"| {name} | {statistics.fmean(losses):.4f} | - |")
    domains = list(next(iter(results.values()))["by_domain"])
    print("\nReal experts per token per domain at the end (mean over the MoE layers):\n\n| setting | seed | "
          + " | ".join(domains) + " |\n|---|---|" + "---|" * len(domains))
    for (name, seed), f in results.items():
        print(f"| {name} | {seed} | " + " | ".join(f"{f['by_domain'].get(d, float('nan')):.2f}" for d in domains) + " |")
    print("\nEval loss per domain at the end:\n\n| setting | seed | " + " | ".join(domains) + " |\n|---|---|"
          + "---|" * len(domains))
    for (name, seed), f in results.items():
        print(f"| {name} | {seed} | " + " | ".join(f"{f['eval_loss_by_domain'].get(d, float('nan')):.3f}"
                                                  for d in domains) + " |")
    (Path(args.output_dir) / "results.json").write_text(json.dumps(
        {f"{name}_seed{seed}": f for (name, seed), f in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
