"""Run under the deepspeed launcher by tests/training/test_streaming.py: prepares the data exactly as train.py does
(rank 0 first), takes --batches N batches of this rank's stream and writes their token ids to
OUTPUT_DIR/batches_rank{R}.pt.

Usage: deepspeed --num_gpus N tests/scripts/stream_ranks.py --batches N <train.py flags>
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moe_models.run.cli import parse_args  # noqa: E402
from moe_models.data.prepare import prepare_data  # noqa: E402
from moe_models.run.distributed import init_world, main_process_first  # noqa: E402
from moe_models.models.tokenization import load_tokenizer  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    count = int(args[args.index("--batches") + 1])
    del args[args.index("--batches"):args.index("--batches") + 2]
    cfg = parse_args(args)
    world = init_world()
    tokenizer = load_tokenizer(cfg.model)
    with main_process_first(world):
        data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    batches = data.train_batches(cfg.train.per_device_train_batch_size, world.rank, world.world_size, cfg.train.seed)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save([next(batches)["input_ids"] for _ in range(count)], out / f"batches_rank{world.rank}.pt")


if __name__ == "__main__":
    main()
