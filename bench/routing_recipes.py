"""Routing recipes side by side: the same dense model upcycled and trained on the built-in corpus with each recipe,
in one invocation, and a table of what each gives.

    python bench/routing_recipes.py [--dense_steps 300] [--steps 300] [--recipes default,aux_free,...] [train.py flags]

First a dense tiny-llama is trained for --dense_steps on the built-in corpus (plain torch, AdamW) and saved; every
recipe then upcycles that same model (`--model_name_or_path`) with `python train.py`, with the same seed, data
order and schedule. Extra flags go to every train.py run. Printed per recipe (markdown):

- eval loss at the end;
- imbalance: max / mean routes per expert over the last half of the training steps, in the worst MoE layer;
- drop fraction: routes dropped by capacity over the last half of the steps, all layers;
- step time: train.py's train_seconds / steps (eval and saves excluded);
- active FFN units per token, as a multiple of the dense FFN's width (the shared recipe does more work per token).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, set_seed

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from moe_models.data.synthetic import synthetic_corpus  # noqa: E402
from moe_models.data.text import pack_blocks  # noqa: E402
from moe_models.models.source import preset_config  # noqa: E402
from moe_models.models.tokenization import byte_level_tokenizer  # noqa: E402

AUX_FREE = ["--score_function", "sigmoid", "--norm_topk_prob", "true", "--router_bias_update_rate", "1e-3",
            "--aux_loss_coef", "0"]
# Each recipe's flags beyond SHARED_FLAGS (8 experts, top-2), and the FFN hidden units a token goes through, in units
# of the dense FFN's width F: the default's top-2 of 8 copies is 2 F; one shared expert adds F; granular G = 4 keeps
# 2 F with top-8 of 32 quarter-width experts (and the same 8 F of expert weights).
RECIPES = {
    "default": ([], 2.0),
    "aux_free": (AUX_FREE, 2.0),
    "aux_free_z": ([*AUX_FREE, "--router_z_loss_coef", "1e-3"], 2.0),
    "shared": (["--num_shared_experts", "1"], 3.0),
    "granular_g4": (["--expert_init", "granular", "--granularity", "4", "--num_experts", "32", "--top_k", "8"], 2.0),
    "drop": (["--expert_init", "drop", "--reinit_ratio", "0.5"], 2.0),
}
SHARED_FLAGS = ["--num_experts", "8", "--top_k", "2", "--logging_steps", "10", "--eval_steps", "0",
                "--max_eval_batches", "20", "--disable_tqdm", "--seed", "42"]


def pretrain_dense(folder: Path, steps: int, seed: int, block_size: int = 128, batch_size: int = 8) -> None:
    """A dense tiny-llama trained on the built-in corpus, saved with its tokenizer: the model every recipe upcycles."""
    set_seed(seed)
    tokenizer = byte_level_tokenizer()
    blocks = pack_blocks(DatasetDict(train=synthetic_corpus(20000, seed)), tokenizer, block_size, "text")["train"]
    ids = torch.tensor(blocks["input_ids"])
    model = AutoModelForCausalLM.from_config(preset_config("tiny-llama")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = ids[torch.randint(len(ids), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"dense step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_recipe(name: str, flags: list[str], dense: Path, root: Path, steps: int, extra: list[str]) -> dict:
    out = root / name
    command = [sys.executable, "train.py", "--model_name_or_path", str(dense), "--max_steps", str(steps),
               *SHARED_FLAGS, *flags, *extra, "--output_dir", str(out)]
    print(f"{name}: {' '.join(command[2:])}", flush=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"eval_loss": summary["eval_loss"], "seconds_per_step": summary["train_seconds"] / summary["steps"],
            **routing_summary([r for r in rows if "loss" in r and r["step"] > steps // 2])}


def routing_summary(rows: list[dict]) -> dict:
    """Worst layer's max/mean routes per expert and the drop fraction, over the given training rows."""
    chosen, kept = {}, {}
    for row in rows:
        for key, value in row.items():
            layer = key.split("/")[1] if key.startswith("moe/layer_") else None
            if key.endswith("/routed_per_expert"):
                chosen[layer] = [a + b for a, b in zip(chosen.get(layer, [0] * len(value)), value)]
            elif key.endswith("/tokens_per_expert"):
                kept[layer] = [a + b for a, b in zip(kept.get(layer, [0] * len(value)), value)]
    imbalance = max(max(load) / (sum(load) / len(load)) for load in chosen.values())
    routes = sum(sum(load) for load in chosen.values())
    return {"imbalance": imbalance, "drop_fraction": 1 - sum(sum(load) for load in kept.values()) / routes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense_steps", type=int, default=300, help="steps of dense pretraining before upcycling")
    parser.add_argument("--steps", type=int, default=300, help="train.py steps per recipe")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--seed", type=int, default=42)
    args, extra = parser.parse_known_args()
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pretrain_dense(root / "dense", args.dense_steps, args.seed)
        results = {name: run_recipe(name, RECIPES[name][0], root / "dense", root, args.steps, extra) for name in names}
    print(f"\n{args.dense_steps} dense steps, then {args.steps} steps per recipe; {torch.get_num_threads()} torch "
          f"threads\n")
    print("| recipe | flags | active FFN units / token | eval loss | imbalance (worst layer) | drop fraction | s/step |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        flags, active = RECIPES[name]
        print(f"| {name} | `{' '.join(flags) or '(defaults)'}` | {active:g} F | {r['eval_loss']:.4f} | "
              f"{r['imbalance']:.2f} | {r['drop_fraction']:.3f} | {r['seconds_per_step']:.3f} |")


if __name__ == "__main__":
    main()
