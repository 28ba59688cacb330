"""Routes per (domain, expert) of every MoE layer over the eval batches: the counts behind I(domain; expert).

After each eval forward every layer holds the expert ids of its routes (``MoEFeedForward.last_topk_ids_TK``: global
ids of this rank's own tokens, in the order of the batch's [B, S] positions); they are counted against the batch's
``domain_ids`` on the device. ``metrics`` sums the tables of all layers over ranks with one all-reduce and turns them
into the eval row's values (``metrics.specialisation``, docs/metrics.md).
"""

from __future__ import annotations

import torch

from ..run.distributed import all_reduce_sum
from ..metrics.specialisation import domain_expert_counts, specialisation_metrics


class DomainRouteCounts:
    """On-device count tables [num_domains, E] of each MoE layer (``layers`` in model order) for one eval."""

    def __init__(self, layers: list, num_domains: int, device: torch.device):
        self.layers, self.num_domains = layers, num_domains
        self.counts = [torch.zeros(num_domains, layer.num_experts, dtype=torch.int64, device=device)
                       for layer in layers]

    @property
    def enabled(self) -> bool:
        """Whether there is anything to count: MoE layers and a domain list."""
        return bool(self.layers) and self.num_domains > 0

    @torch.no_grad()
    def add(self, domain_ids_BS: torch.Tensor | None) -> None:
        """Count the routes of the forward just run on a batch with these domain ids (None: the data has none)."""
        if not self.enabled or domain_ids_BS is None:
            return
        domain_ids_T = domain_ids_BS.reshape(-1).to(self.counts[0].device)  # one copy for all layers
        for counts_NE, layer in zip(self.counts, self.layers):
            topk_ids_TK = layer.last_topk_ids_TK
            if topk_ids_TK is None:
                raise RuntimeError(f"{type(layer).__name__} kept no routes of the last forward: its router does not "
                                   "report expert ids (see docs/metrics.md, specialisation by domain)")
            counts_NE += domain_expert_counts(topk_ids_TK, domain_ids_T, self.num_domains, layer.num_experts)

    def metrics(self) -> dict:
        """``moe/layer_{i}/domain_expert_counts`` and the mutual information per layer, summed over all ranks (one
        all-reduce; every rank must call it); {} with nothing to count."""
        if not self.enabled:
            return {}
        summed = all_reduce_sum(torch.cat([counts_NE.flatten() for counts_NE in self.counts])).tolist()
        row, offset = {}, 0
        for i, counts_NE in enumerate(self.counts):
            N, E = counts_NE.shape
            table = [summed[offset + d * E:offset + (d + 1) * E] for d in range(N)]
            offset += N * E
            row.update({f"moe/layer_{i}/{key}": value for key, value in specialisation_metrics(table).items()})
        return row
