"""--compile vs eager: the time of a training step with each decoder block compiled, as a ratio to eager, for the
default model and a larger one, side by side in one process.

    python bench/compile_step.py [--blocks 3] [--block_steps 5] [--threads N] [--gpu] [train.py flags ...]

Per model: one trainer in bf16 (the grouped experts compile in bf16 only) with its blocks compiled (train.py's
--compile); its first step pays the compile and is timed on its own. Then blocks of optimizer steps alternate
eager / compiled on the same trainer (``torch.compiler.set_stance("force_eager")`` runs the compiled blocks
eagerly), so drift and other load hit both sides; the median block of each side, in wall time per step.
Models: the default (tiny-llama, d128 f256 L4, 8 experts, top-2) and the same family at d512 f1024 (8 heads);
extra flags go to both. --gpu: the GPU sizes instead (d1024 f3584 L8 and d2048 f5632 L8, 8 x 2048 tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _on_off import timed  # noqa: E402

from moe_models.models.source import preset_config  # noqa: E402
from moe_models.run.cli import parse_args  # noqa: E402
from train import build  # noqa: E402

CPU_SIZES = {"default (d128 f256 L4)": None,
             "d512 f1024 L4": dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                   num_key_value_heads=8)}
GPU_SIZES = {"d1024 f3584 L8": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                                    num_attention_heads=16, num_key_value_heads=8),
             "d2048 f5632 L8": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                                    num_attention_heads=16, num_key_value_heads=8)}


def bf16_deepspeed_json(folder: Path) -> Path:
    config = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero1.json").read_text())
    config["bf16"] = {"enabled": True}
    path = folder / "bf16.json"
    path.write_text(json.dumps(config))
    return path


def model_flags(sizes: dict | None, folder: Path) -> list[str]:
    if sizes is None:
        return []
    config = preset_config("tiny-llama")
    for key, value in sizes.items():
        setattr(config, key, value)
    path = folder / "config.json"
    config.to_json_file(path)
    return ["--model_config", str(path)]


def measure(name: str, sizes: dict | None, args, train_flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        cfg = parse_args(["--output_dir", str(folder / "run"), "--disable_tqdm", "--max_steps", "100000",
                          "--deepspeed", str(bf16_deepspeed_json(folder)), "--compile", *model_flags(sizes, folder),
                          *train_flags])
        _, trainer = build(cfg)
        trainer.engine.train()

        def steps(count: int) -> None:
            for _ in range(count):
                trainer.train_step()

        def block(compiled: bool) -> float:
            if compiled:
                return timed(steps, args.block_steps)[0]
            with torch.compiler.set_stance("force_eager"):
                return timed(steps, args.block_steps)[0]

        started = time.perf_counter()
        steps(1)  # the compile
        first = time.perf_counter() - started
        block(False), block(True)  # warm-up
        times = {False: [], True: []}
        for _ in range(args.blocks):
            for compiled in (False, True):
                times[compiled].append(block(compiled))
        eager, compiled = (statistics.median(times[side]) for side in (False, True))
        return {"model": name, "tokens": trainer.tokens_per_step, "first": first, "eager": eager,
                "compiled": compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3, help="measured blocks per side")
    parser.add_argument("--block_steps", type=int, default=5, help="optimizer steps per block")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--gpu", action="store_true", help="the GPU model sizes, 8 x 2048 tokens")
    args, train_flags = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = GPU_SIZES if args.gpu else CPU_SIZES
    if args.gpu:
        train_flags = ["--block_size", "2048", "--per_device_train_batch_size", "8", *train_flags]
    results = [measure(name, size, args, train_flags) for name, size in sizes.items()]
    print(f"bf16, {args.blocks} x {args.block_steps} steps per side, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}")
    print("| model | tokens/step | first compiled step s | eager ms/step | compiled ms/step | compiled / eager |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['tokens']} | {r['first']:.1f} | {1000 * r['eager']:.1f} | "
              f"{1000 * r['compiled']:.1f} | {r['compiled'] / r['eager']:.3f} |")


if __name__ == "__main__":
    main()
