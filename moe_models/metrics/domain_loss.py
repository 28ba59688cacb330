"""Eval loss per domain: the next-token loss of the tokens of each domain, beside the overall ``eval_loss``.

A target token belongs to the domain of its own position (``domain_ids`` of the predicted token); tokens without
a domain (-1) count only in ``eval_loss``. With every token in a domain, the target-weighted mean of the
per-domain losses is ``eval_loss``. Compared with the built-in corpus's entropy floor per domain
(``data.synthetic.entropy_floor``), it says which domains a model has learnt and which it has not (docs/payoff.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def domain_loss_sums(logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor, domain_ids_BS: torch.Tensor,
                     num_domains: int) -> torch.Tensor:
    """[2, num_domains] float64: per domain, the summed next-token loss (nats) of its target tokens and their
    number. On the device: no host sync."""
    loss_T = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(), input_ids_BS[:, 1:].flatten(), reduction="none")
    domain_T = domain_ids_BS[:, 1:].flatten().to(loss_T.device)
    counted_T = (domain_T >= 0) & (domain_T < num_domains)
    bins_T = torch.where(counted_T, domain_T, num_domains)  # the last bin: tokens without a domain, dropped
    sums = torch.zeros(2, num_domains + 1, dtype=torch.float64, device=loss_T.device)
    sums[0].scatter_add_(0, bins_T, loss_T.double())
    sums[1].scatter_add_(0, bins_T, torch.ones_like(loss_T, dtype=torch.float64))
    return sums[:, :num_domains]


def domain_loss_metrics(sums: list[list[float]], domains: Sequence[str]) -> dict:
    """``eval_loss/{domain}`` for each domain with target tokens, from summed ``domain_loss_sums`` (as lists)."""
    losses, counts = sums
    return {f"eval_loss/{name}": loss / count for name, loss, count in zip(domains, losses, counts) if count > 0}
