"""Expert specialisation by domain, as formulas: routes counted per (domain, expert), and the mutual information
I(domain; expert) of those counts (docs/metrics.md).

Every route of a token (k per token with top-k routing) is one sample of the pair (domain of the token, expert it
goes to). From the counts n[d, e]:

    p(d, e) = n[d, e] / sum n,   p(d) = sum_e p(d, e),   p(e) = sum_d p(d, e)
    I(domain; expert) = sum_{d,e: n > 0} p(d, e) log2( p(d, e) / (p(d) p(e)) )      bits
    H(domain) = -sum_d p(d) log2 p(d)                                                bits

I is 0 when the experts a token goes to say nothing about its domain, and H(domain) (its maximum: I <= H(domain))
when every expert serves one domain only. No library computes it from a count table without a dependency the
project does not have (sklearn's mutual_info_score does, in nats), so it is these few lines.
"""

from __future__ import annotations

import math

import torch


def domain_expert_counts(topk_ids_TK: torch.Tensor, domain_ids_T: torch.Tensor, num_domains: int,
                         num_experts: int) -> torch.Tensor:
    """Routes per (domain, expert) [num_domains, num_experts] (int64) of one forward: each token's k expert ids
    (``topk_ids_TK``; -1 = a route dropped by capacity) against its domain id (``domain_ids_T``; -1 = no domain).
    Dropped routes and tokens without a domain are not counted. A scatter on the device: no host sync."""
    domain_TK = domain_ids_T.to(topk_ids_TK.device, torch.int64).unsqueeze(1).expand_as(topk_ids_TK)
    counted_TK = (domain_TK >= 0) & (domain_TK < num_domains) & (topk_ids_TK >= 0)
    cells = num_domains * num_experts
    bins_R = torch.where(counted_TK, domain_TK * num_experts + topk_ids_TK, cells).reshape(-1)  # last bin: not counted
    counts = torch.zeros(cells + 1, dtype=torch.int64, device=topk_ids_TK.device)
    return counts.scatter_add_(0, bins_R, torch.ones_like(bins_R))[:cells].view(num_domains, num_experts)


def entropy_bits(counts: list[float]) -> float:
    """Entropy in bits of the distribution the counts are proportional to (0 without counts)."""
    total = sum(counts)
    return -sum(n / total * math.log2(n / total) for n in counts if n > 0) if total > 0 else 0.0


def mutual_information_bits(counts_NE: list[list[float]]) -> float:
    """I(domain; expert) in bits of a domain x expert count table (0 without counts); the formula above."""
    total = sum(map(sum, counts_NE))
    if total <= 0:
        return 0.0
    domain_N = [sum(row) for row in counts_NE]
    expert_E = [sum(column) for column in zip(*counts_NE)]
    return max(0.0, sum(n / total * math.log2(n * total / (domain_N[d] * expert_E[e]))
                        for d, row in enumerate(counts_NE) for e, n in enumerate(row) if n > 0))


def specialisation_metrics(counts_NE: list[list[int]]) -> dict:
    """One MoE layer's eval-row values from its count table summed over ranks and eval batches: the counts
    (``domain_expert_counts``), ``domain_mutual_information`` (bits) and ``domain_mutual_information_normalised``
    (I / H(domain), from 0 to 1; absent when the counted tokens hold a single domain, where H(domain) = 0);
    {} when no route was counted."""
    if not any(map(any, counts_NE)):
        return {}
    information = mutual_information_bits(counts_NE)
    row = {"domain_expert_counts": counts_NE, "domain_mutual_information": information}
    domain_entropy = entropy_bits([sum(domain_row) for domain_row in counts_NE])
    if domain_entropy > 0:
        row["domain_mutual_information_normalised"] = information / domain_entropy
    return row
