"""The plan's bytes for `--dispatcher node_once` (moe/node_once.py): what one rank sends per step inside its node and
across nodes, as the dispatcher counts them (docs/multi-node.md, "The node-once dispatcher").

Per MoE layer and micro-batch of T tokens (P = ep_size, g = min(P, devices per node) ranks of the group per node,
n = P / g nodes, V = nodes a token's routes reach, k routes per token, r = a row's bytes, passes = forward and
backward, plus the recompute with activation checkpointing):

- across: a token goes once to each node it needs but its own, with 2 k fp32 route values (weights and ids), and
  one row comes back; averaged over the ranks, (n - 1) / n of the token-node pairs leave the node:
  passes x T x V x (n - 1) / n x (2 r + 8 k);
- in node: the relay sends each route to its expert's rank, (g - 1) / g of them to another rank, and the output
  comes back: passes x 2 x T x k x (g - 1) / g x r.

V: with --benchmark_balanced_routing (token t's routes on experts (t k + j) mod E) counted exactly over the T
tokens; otherwise the expectation for k distinct experts drawn evenly from those a token may choose (with
--max_groups_per_token: the experts of M of the groups, every choice of M groups alike).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch

from ..run.config import ConfigError, MoEConfig
from ..run.moe_layout import expert_counts


def nodes_per_token(num_experts: int, top_k: int, nodes: int, tokens: int, balanced: bool, expert_groups: int = 1,
                    max_groups: int = 1) -> float:
    """V: the mean number of the group's ``nodes`` (each holding num_experts / nodes consecutive experts) a token's
    ``top_k`` routes reach."""
    per_node = num_experts // nodes
    if balanced:
        node_TK = (torch.arange(tokens * top_k) % num_experts).view(tokens, top_k) // per_node
        node_TK = node_TK.sort(dim=1).values
        return float((1 + (node_TK[:, 1:] != node_TK[:, :-1]).sum(dim=1)).double().mean())
    per_group = num_experts // expert_groups
    reached = []
    for groups in combinations(range(expert_groups), max_groups):
        allowed = {e for q in groups for e in range(q * per_group, (q + 1) * per_group)}
        on_node = [sum(1 for e in allowed if e // per_node == m) for m in range(nodes)]
        reached.append(sum(1 - math.comb(len(allowed) - a, top_k) / math.comb(len(allowed), top_k) for a in on_node))
    return sum(reached) / len(reached)


def node_once_bytes(moe: MoEConfig, moe_layers: int, top_k: int, hidden_size: int, setup,
                    devices_per_node: int) -> tuple[float, float]:
    """(in node, across nodes) bytes one rank sends per optimizer step; ``setup``: training/preflight.Setup."""
    P = setup.ep_size
    if P <= 1:
        return 0.0, 0.0
    g = min(P, devices_per_node)
    if P % g:
        raise ConfigError([f"--dispatcher node_once needs ep_size ({P}) to be a multiple of the devices per node "
                           f"({devices_per_node}); use --dispatcher per_route or another --ep_size"])
    nodes, tokens = P // g, setup.micro_batch * setup.block_size
    row = hidden_size * (2 if setup.bf16 else 4)
    passes = (2 + (1 if setup.activation_checkpointing else 0)) * setup.gradient_accumulation_steps
    counts = expert_counts(moe) * (moe_layers if len(expert_counts(moe)) == 1 else 1)
    groups, keep = moe.expert_groups, moe.max_groups_per_token
    limited = keep is not None and keep < groups
    across = sum(nodes_per_token(E, top_k, nodes, tokens, moe.benchmark_balanced_routing,
                                 groups if limited else 1, keep if limited else 1) for E in counts)
    across *= passes * tokens * (nodes - 1) / nodes * (2 * row + 2 * top_k * 4)
    in_node = passes * 2 * tokens * top_k * (g - 1) / g * row * len(counts)
    return in_node, across
