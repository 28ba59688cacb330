"""DeepSpeed's AutoEP beside train.py, from the same HF MoE checkpoint at ep_size 2: the first steps' losses, tokens/s
and peak host memory per rank, side by side.

    python bench/autoep_peer.py --save DIR --family mixtral|qwen3_moe|deepseek_v3   # once: a small checkpoint
    python bench/autoep_peer.py --model_dir DIR [--steps 8] [train.py flags...]

--save writes a small model of the family (d 256, 4 blocks, 8 experts of width 256, top-2; DeepSeek-V3: the first
block dense, a shared expert, 4 groups of which 2 chosen) with random weights and the byte-level tokenizer, in the
hub's layout (save_pretrained). Mixtral and Qwen3-MoE are saved with router_aux_loss_coef 0, so both sides train
the LM loss alone.

Then the deepspeed launcher starts 2 ranks twice (CPU ranks when there is no GPU), one engine per launch, so each
peak is its own:
- ours: the run train.py builds from `--model_name_or_path DIR --ep_size 2` (train.py `build`: the folder continued
  in place), its steps (`TrainLoop.train_step`);
- AutoEP: `from_pretrained(DIR)` and `deepspeed.initialize` with the same DeepSpeed JSON (the run's, its "auto"
  values filled from the same flags) plus `"expert_parallel": {"enabled": true, "autoep_size": 2}`, the same
  optimizer groups and the same batches (the run's data, each rank its share).
Each step's LM loss is the mean over the ranks; tokens/s counts the steps after the first; the peak is each rank's
resident memory over the build and the steps above its memory at start (bench/_host_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")
ENGINES = ("ours", "autoep")
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=512, num_experts_per_tok=2, tie_word_embeddings=False)


def parse() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, required=True)
    parser.add_argument("--save", action="store_true", help="write a small checkpoint of --family and stop")
    parser.add_argument("--family", choices=FAMILIES, default="mixtral")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=600, help="seconds each launch may take")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_known_args()


def family_config(family: str):
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

    if family == "mixtral":
        return MixtralConfig(**SMALL, num_local_experts=8, router_aux_loss_coef=0.0)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**SMALL, num_experts=8, moe_intermediate_size=256, head_dim=64, router_aux_loss_coef=0.0)
    return DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, n_routed_experts=8, moe_intermediate_size=256,
                            n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=128,
                            kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=64)


def save(model_dir: Path, family: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from moe_models.models.tokenization import byte_level_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family))
    model.save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    print(f"saved {family}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters to {model_dir}")


def launch(args: argparse.Namespace, engine: str, train_flags: list[str], result: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", __file__, "--engine", engine,
               "--model_dir", str(args.model_dir), "--steps", str(args.steps), "--result", str(result), *train_flags]
    subprocess.run(command, cwd=REPO, env=env, timeout=args.timeout, check=True)


def worker(args: argparse.Namespace, train_flags: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    from _host_memory import PeakAbove
    peak = PeakAbove()

    import torch
    import torch.distributed as dist
    from moe_models.run.cli import parse_args

    output_dir = args.result.parent / f"{args.engine}_run"  # the launch's scratch folder, the same on every rank
    cfg = parse_args(["--model_name_or_path", str(args.model_dir), "--ep_size", "2", "--max_steps", str(args.steps),
                      "--disable_tqdm", "--output_dir", str(output_dir), *train_flags])
    step, tokens_per_step, rank = (build_ours if args.engine == "ours" else build_autoep)(cfg)
    losses, seconds = [], []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = step().detach().double()
        dist.all_reduce(loss)
        seconds.append(time.perf_counter() - started)
        losses.append(loss.item() / dist.get_world_size())
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak.bytes())
    if rank == 0:
        path = "in place" if args.engine == "ours" else "AutoEP"
        args.result.write_text(json.dumps({
            "path": path, "losses": losses, "peaks": peaks, "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step * (len(seconds) - 1) / sum(seconds[1:]), "torch": torch.__version__}))


def build_ours(cfg):
    from train import build

    world, trainer = build(cfg)
    return trainer.train_step, trainer.tokens_per_step, world.rank


def build_autoep(cfg):
    import deepspeed
    from transformers import AutoModelForCausalLM

    from moe_models.data.batches import model_inputs
    from moe_models.data.prepare import prepare_data
    from moe_models.models.tokenization import load_tokenizer
    from moe_models.run.distributed import init_world
    from moe_models.training.ds_config import training_dtype
    from moe_models.training.engine import optimizer_param_groups
    from moe_models.training.validate import validate

    ds_config = validate(cfg, world_size=int(os.environ["WORLD_SIZE"]))
    ds_config["expert_parallel"] = {"enabled": True, "autoep_size": cfg.moe.ep_size}
    world = init_world(cfg.train.dist_timeout_s)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    batches = data.train_batches(cfg.train.per_device_train_batch_size, world.rank, world.world_size,
                                 seed=cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.model_name_or_path, dtype=training_dtype(ds_config))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=optimizer_param_groups(model, cfg.train.weight_decay))
    engine.train()

    def step():
        loss = 0.0
        for _ in range(cfg.train.gradient_accumulation_steps):
            lm_loss = engine(**model_inputs(next(batches), world.device)).loss
            engine.backward(lm_loss)
            engine.step()
            loss = loss + lm_loss.detach()
        return loss

    tokens = (cfg.train.per_device_train_batch_size * cfg.data.block_size * cfg.train.gradient_accumulation_steps
              * world.world_size)
    return step, tokens, world.rank


def report(results: dict, model_dir: Path) -> None:
    import deepspeed
    import torch

    print(f"\n{model_dir}: ep_size 2 on 2 ranks, torch {torch.__version__}, deepspeed {deepspeed.__version__}; "
          f"{results['ours']['tokens_per_step']} tokens/step")
    print(f"{'step':>4} " + " ".join(f"{engine + ' loss':>12}" for engine in results) + f" {'difference':>11}")
    for i, pair in enumerate(zip(*(r["losses"] for r in results.values())), 1):
        print(f"{i:>4} " + " ".join(f"{loss:>12.5f}" for loss in pair) + f" {pair[1] - pair[0]:>+11.1e}")
    for engine, r in results.items():
        peaks = " / ".join(f"{p / 2**20:.0f}" for p in r["peaks"])
        print(f"{engine} ({r['path']}): {r['tokens_per_s']:.0f} tokens/s after the first step; peak per rank "
              f"{peaks} MiB above the start")


def main() -> None:
    args, train_flags = parse()
    if args.save:
        return save(args.model_dir, args.family)
    if args.engine:
        return worker(args, train_flags)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for engine in ENGINES:
            launch(args, engine, train_flags, Path(scratch) / f"{engine}.json")
            results[engine] = json.loads((Path(scratch) / f"{engine}.json").read_text())
    report(results, args.model_dir)


if __name__ == "__main__":
    main()
