"""Export a train.py or MoETrainer checkpoint as a native HF MoE model: the `moe-export` command
(``python -m moe_models.export``; the library: hf/exporter.py).

    moe-export --checkpoint OUT/checkpoints [--tag TAG] --output HF_DIR     # a train.py run
    moe-export --checkpoint OUT[/checkpoint-N] --output HF_DIR             # an MoETrainer run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .hf.export_fidelity import differences_in_training
from .hf.exporter import export, moe_settings
from .run.cli import ShortErrorParser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ShortErrorParser(
        prog="python -m moe_models.export", allow_abbrev=False,
        description="Export a train.py DeepSpeed MoE checkpoint as a native Hugging Face MoE model (Mixtral for "
                    "Llama/Mistral, Qwen2-MoE / Qwen3-MoE for Qwen2/Qwen3, and more: docs/export.md), or a run "
                    "that continued an HF MoE in place as its own class, with its tokenizer.")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="the checkpoints/ folder of a train.py output folder (OUT/checkpoints); or a folder "
                        "MoETrainer saved (a Trainer checkpoint-N, a save_model() folder) or its output_dir (the "
                        "newest checkpoint-N)")
    parser.add_argument("--tag", default=None, help="which DeepSpeed checkpoint, e.g. global_step300 (default: the "
                        "newest, named in the `latest` file)")
    parser.add_argument("--output", required=True, type=Path, help="folder to write the HF model and tokenizer to")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config = export(args.checkpoint, args.output, args.tag, args.overwrite)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    for note in differences_in_training(moe_settings(args.checkpoint)):
        print(f"note: {note}")
    print(f"Wrote {config.architectures[0]} ({config.model_type}) and the tokenizer to {args.output}")


if __name__ == "__main__":
    main()
