"""What every in-place family's own test does: the check against its stock class (the same loss, and every
parameter's gradient the stock one's), and a folder of the family trained three steps by train.py."""

from __future__ import annotations

from typing import Callable

import torch

import train
from moe_models.run.cli import parse_args
from moe_models.run.folder import RunFolder


def stock_name(name: str) -> str:
    """A swapped model's parameter name as the stock model spells it: ``...experts.deepspeed_moe.experts.X`` is
    ``...experts.X``."""
    return name.replace(".deepspeed_moe.experts.", ".")


def assert_stock_loss_and_gradients(stock: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor,
                                    name_in_stock: Callable[[str], str] = stock_name) -> None:
    """``model`` (experts swapped) gives ``stock``'s loss on ``ids`` to 1e-6 and, after both backward passes, each
    parameter the gradient of the stock one ``name_in_stock`` names (to 1e-4 of its largest). Where the stock
    parameter holds rows past the swapped one's (LongCat-Flash's gate_up_proj, a row per identity expert), those
    rows get no gradient."""
    expected = stock(input_ids=ids, labels=ids, use_cache=False).loss
    got = model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    expected.backward()
    got.backward()
    reference = dict(stock.named_parameters())
    for name, param in model.named_parameters():
        stock_grad = reference[name_in_stock(name)].grad
        if stock_grad.dim() and stock_grad.shape[0] > param.shape[0]:
            assert not stock_grad[param.shape[0]:].any(), name
            stock_grad = stock_grad[:param.shape[0]]
        torch.testing.assert_close(param.grad, stock_grad, rtol=1e-4, atol=1e-4 * stock_grad.abs().max().item(),
                                   msg=name)


def train_three_steps(folder, output_dir, *flags: str) -> tuple[torch.nn.Module, dict]:
    """``folder`` continued in place by train.py for three steps (batches of 2 x 32 tokens, a checkpoint at step 3,
    the schedule warming up from 0: the weights move from the second step on), with ``flags`` besides: the trained
    model (eval mode) and the last training row."""
    cfg = parse_args(["--model_name_or_path", str(folder), "--max_steps", "3", "--save_steps", "3",
                      "--logging_steps", "1", "--eval_steps", "0", "--max_eval_batches", "1", "--synthetic_examples",
                      "100", "--block_size", "32", "--per_device_train_batch_size", "2", "--warmup_steps", "1",
                      "--disable_tqdm", "--output_dir", str(output_dir), *flags])
    _, trainer = train.build(cfg)
    trainer.train()
    rows = [row for row in RunFolder(output_dir).metrics.rows() if "loss" in row]
    return trainer.engine.module.eval(), rows[-1]
