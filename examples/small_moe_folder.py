"""Write a small folder of an HF MoE family, as `save_pretrained` writes a hub checkpoint, to try continuing an MoE in
place without downloading one: the family's config made small (a few layers, 8 experts, top-2), fresh weights, and a
byte-level tokenizer.

    python examples/small_moe_folder.py --model_type deepseek_v3 --output small-deepseek-v3
    python train.py --model_name_or_path small-deepseek-v3 --max_steps 20 --output_dir runs/deepseek-v3
    deepspeed --num_gpus 2 train.py --model_name_or_path small-deepseek-v3 --ep_size 2 --deepspeed zero2 \\
        --max_steps 20 --output_dir runs/deepseek-v3-ep2
    python -m moe_models.export --checkpoint runs/deepseek-v3/checkpoints --output runs/deepseek-v3/hf

With a real checkpoint, pass its folder to train.py instead (docs/models.md, "Continue an MoE in place").
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_models.models.probe import small_moe_config
from moe_models.models.tokenization import byte_level_tokenizer


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_type", default="deepseek_v3",
                        help="an HF MoE family's model_type (docs/models.md lists those that continue in place)")
    parser.add_argument("--output", type=Path, required=True, help="the folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output.exists():
        parser.error(f"{args.output} exists: pick a new folder")
    config = small_moe_config(AutoConfig.for_model(args.model_type))
    tokenizer = byte_level_tokenizer()
    config.get_text_config().vocab_size = len(tokenizer)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"{args.output}: a {args.model_type} model of {sum(p.numel() for p in model.parameters()):,} parameters "
          f"and its tokenizer")
    return args.output


if __name__ == "__main__":
    main()
