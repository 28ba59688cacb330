"""Run under the deepspeed launcher by tests/training/test_hf_trainer_distributed.py: MoETrainer with DeepSpeed ZeRO-2
on tiny-llama converted to 4 experts (exact routing; sigmoid scores with the aux-loss-free bias, which export to
GLM4-MoE; z-loss), logging every step. Writes
OUTPUT_DIR/result_rank{R}.pt: the Trainer's log history, the aux-loss-free biases and, after training, a fixed batch
and its logits (every rank runs the forward: at ep_size 2 each holds half the experts); then
save_model(OUTPUT_DIR/final).

Usage: deepspeed --num_gpus 2 tests/scripts/hf_trainer_run.py --ep_size N --output_dir DIR --max_steps K
       [--save_steps S] [--resume CHECKPOINT_DIR]
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import ZERO2, tiny_blocks, tiny_moe_model, trainer_args  # noqa: E402
from moe_models import MoETrainer  # noqa: E402
from moe_models.models.tokenization import byte_level_tokenizer  # noqa: E402

LOGITS_INPUT = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep_size", type=int, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--max_steps", type=int, required=True)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--local_rank", type=int, default=-1)  # the launcher's
    cli = parser.parse_args()
    args = trainer_args(cli.output_dir, deepspeed=ZERO2, max_steps=cli.max_steps, save_strategy="steps",
                        save_steps=cli.save_steps, per_device_train_batch_size=2, lr_scheduler_type="cosine",
                        warmup_steps=1)
    # a resumed run starts from other weights: everything must come from the checkpoint
    model = tiny_moe_model(seed=1 if cli.resume else 0, ep_size=cli.ep_size, router_z_loss_coef=0.01,
                           score_function="sigmoid", router_bias_update_rate=0.02)
    trainer = MoETrainer(model=model, args=args, train_dataset=tiny_blocks(), data_collator=default_data_collator,
                         processing_class=byte_level_tokenizer())
    trainer.train(resume_from_checkpoint=cli.resume)
    with torch.no_grad():
        logits = trainer.model.eval()(LOGITS_INPUT).logits
    result = {"log_history": trainer.state.log_history, "logits_input": LOGITS_INPUT, "logits": logits,
              "score_bias": [layer.router.score_bias.clone() for layer in trainer.moe_layers]}
    torch.save(result, cli.output_dir / f"result_rank{trainer.args.process_index}.pt")
    trainer.save_model(str(cli.output_dir / "final"))


if __name__ == "__main__":
    main()
