"""Upcycle a dense model into a Mixture-of-Experts model and train it with the stock transformers Trainer.

    python examples/hf_trainer.py                                   # one process, plain PyTorch
    python examples/hf_trainer.py --deepspeed                       # one process, DeepSpeed ZeRO-2
    deepspeed --num_gpus 2 examples/hf_trainer.py --deepspeed --ep_size 2   # experts split over 2 ranks
    python -m moe_models.export --checkpoint outputs/hf_trainer --output outputs/hf_trainer/hf   # a Mixtral folder

The only change from a dense Trainer script: `convert_to_moe` after loading the model, and `MoETrainer` for `Trainer`.
The eval blocks carry each token's domain (`domain_ids`), so every eval also counts the routes per (domain, expert).
"""

import argparse

import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator, set_seed

from moe_models import MoEConfig, MoETrainer, convert_to_moe
from moe_models.data.synthetic import DOMAINS, synthetic_corpus
from moe_models.data.text import pack_blocks
from moe_models.models.source import preset_config
from moe_models.models.tokenization import byte_level_tokenizer

# ZeRO-2; "auto" values come from TrainingArguments. No "optimizer" section: the Trainer's AdamW is used (one may be
# added; MoETrainer gives DeepSpeed the expert parameter groups either way).
DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/hf_trainer")
    parser.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed (ZeRO-2)")
    parser.add_argument("--ep_size", type=int, default=1, help="ranks that share one copy of the experts")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="one device's peak TFLOPS, for MFU (known GPUs need none; a CPU has no known peak)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_args()


def main():
    cli = parse_args()
    args = TrainingArguments(
        output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.1, logging_steps=10, save_steps=50,
        eval_strategy="steps", eval_steps=50, report_to="none", seed=0, deepspeed=DEEPSPEED if cli.deepspeed else None,
        use_cpu=not torch.cuda.is_available())  # without it a CPU-only DeepSpeed run miscounts its ranks
    set_seed(0)

    tokenizer = byte_level_tokenizer()  # or AutoTokenizer.from_pretrained("your/dense-model")
    model = AutoModelForCausalLM.from_config(preset_config("tiny-llama"))  # or .from_pretrained("your/dense-model")
    # Dropless, deterministic top-2 routing: the exported Mixtral then computes exactly what was trained.
    model = convert_to_moe(model, MoEConfig(num_experts=8, top_k=2, ep_size=cli.ep_size, aux_loss_coef=0.01,
                                            router_z_loss_coef=0.001, drop_tokens=False,
                                            top2_2nd_expert_sampling=False))

    texts = DatasetDict({"train": synthetic_corpus(2000, seed=0)})  # each text tagged with its domain
    blocks = pack_blocks(texts, tokenizer, block_size=128, text_column="text", domains=list(DOMAINS))["train"]
    blocks = blocks.map(lambda batch: {"labels": batch["input_ids"]}, batched=True)
    split = blocks.train_test_split(test_size=32, seed=0)

    trainer = MoETrainer(model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"],
                         processing_class=tokenizer, data_collator=default_data_collator,
                         domains=DOMAINS, peak_tflops=cli.peak_tflops)
    trainer.train(resume_from_checkpoint=True if cli.resume else None)


if __name__ == "__main__":
    main()
