"""Routes per (domain, expert) of every MoE layer over the eval batches: the counts behind I(domain; expert), and with
the tokens per domain the real experts (and their FLOPs) a token of each domain ran.

After each eval forward every layer holds the expert ids of its routes (``MoEFeedForward.last_topk_ids_TK``: global
ids of this rank's own tokens, in the order of the batch's [B, S] positions); they are counted against the batch's
``domain_ids`` on the device. ``metrics`` sums the tables of all layers over ranks with one all-reduce and turns them
into the eval row's values (``metrics.specialisation``, docs/metrics.md).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..metrics.routing import domain_real_experts_metrics
from ..metrics.specialisation import domain_expert_counts, specialisation_metrics
from ..metrics.throughput import expert_parameters
from ..run.distributed import all_reduce_sum


class DomainRouteCounts:
    """On-device count tables [num_domains, E] of each MoE layer (``layers`` in model order) and the eval tokens per
    domain [num_domains] for one eval; ``domains`` names the domains in the row's keys (default: their ids)."""

    def __init__(self, layers: list, num_domains: int, device: torch.device, domains: Sequence[str] | None = None):
        self.layers, self.num_domains = layers, num_domains
        self.domains = list(domains) if domains else [str(d) for d in range(num_domains)]
        self.counts = [torch.zeros(num_domains, layer.num_experts, dtype=torch.int64, device=device)
                       for layer in layers]
        self.tokens_N = torch.zeros(num_domains, dtype=torch.int64, device=device)

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
        counted_T = (domain_ids_T >= 0) & (domain_ids_T < self.num_domains)
        bins_T = torch.where(counted_T, domain_ids_T.long(), self.num_domains)  # last bin: not counted; a scatter,
        self.tokens_N += torch.zeros(self.num_domains + 1, dtype=torch.int64, device=bins_T.device).scatter_add_(
            0, bins_T, torch.ones_like(bins_T))[:self.num_domains]  # no host sync (bincount's would read the max)
        for counts_NE, layer in zip(self.counts, self.layers):
            topk_ids_TK = layer.last_topk_ids_TK
            if topk_ids_TK is None:
                raise RuntimeError(f"{type(layer).__name__} kept no routes of the last forward: its router does not "
                                   "report expert ids (see docs/metrics.md, specialisation by domain)")
            counts_NE += domain_expert_counts(topk_ids_TK, domain_ids_T, self.num_domains, layer.num_experts)

    def metrics(self) -> dict:
        """``moe/layer_{i}/domain_expert_counts``, the mutual information and the real experts (and their FLOPs) per
        token of each domain, per layer, summed over all ranks (one all-reduce; every rank must call it); {} with
        nothing to count."""
        if not self.enabled:
            return {}
        summed = all_reduce_sum(torch.cat([self.tokens_N, *(counts_NE.flatten() for counts_NE in self.counts)]))
        summed = summed.tolist()  # one host read
        tokens_N, summed = summed[:self.num_domains], summed[self.num_domains:]
        row, offset = {}, 0
        for i, (counts_NE, layer) in enumerate(zip(self.counts, self.layers)):
            N, E = counts_NE.shape
            table = [summed[offset + d * E:offset + (d + 1) * E] for d in range(N)]
            offset += N * E
            values = specialisation_metrics(table)
            if values:
                values.update(domain_real_experts_metrics([sum(r) for r in table], tokens_N, self.domains,
                                                          expert_parameters(layer)))
            row.update({f"moe/layer_{i}/{key}": value for key, value in values.items()})
        return row
