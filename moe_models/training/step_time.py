"""A step-time model for the preflight plan: how long one optimizer step takes on a cluster, part by part, from the
plan's counts (training/preflight.py) and a ``Cluster`` (training/clusters.py). docs/multi-node.md#choosing-a-layout
writes each formula out; tests/training/test_step_time.py checks them against hand computations.

Per optimizer step and rank (T = micro-batch x block x accumulation tokens, W ranks, P = ep_size, G devices per node):

- compute: T x FLOPs per token (6 N_active + attention) / the sustained matmul rate; activation checkpointing adds
  one forward (a third more);
- all-to-all: the plan's bytes per step (even routing), split over the expert-parallel group's peers: DeepSpeed puts
  the group's P ranks next to each other (ranks i P .. i P + P - 1), so min(P, G) - 1 peers share the node and
  P - min(P, G) are on other nodes; in-node and cross-node sends run at once (the slower sets the time), plus one
  latency per exchange (per MoE layer, 3 in each forward: the per-expert counts, dispatch and combine; 2 in the
  backward: the gradients of dispatch and combine); with --dispatcher node_once (training/node_once_bytes.py counts
  its bytes) the two levels run one after the other: the cross-node part, then the in-node part, each at its own
  rate, with 4 exchanges across and 3 inside per forward (3 and 2 in the backward); --plan_search ranks its layouts
  with the per-route dispatcher;
- gradients: the dense gradients reduced over all W ranks and each rank's experts' over its expert-data-parallel
  group (W / P ranks, strided by P); a ring moves 2 (W - 1) / W of the bytes per rank (ZeRO 0: an all-reduce; ZeRO 1/2:
  a reduce-scatter and, after the step, the all-gather of the updated parameters: the same bytes), over the
  cross-node links as soon as the group spans nodes;
- optimizer: Adam reads and writes ~32 bytes per parameter of its partition (fp32 weight or master, two moments,
  the gradient, the bf16 copy), and the engine passes over every local gradient and weight once more (~16 bytes per
  local parameter: DeepSpeed copies the gradients into its flat reduction buckets and the updated partitions back
  into the module's weights): these bytes / the memory bandwidth. On a GPU both are small; on a CPU, where torch's
  unfused AdamW makes many passes, the cluster file's memory_bandwidth should be the rate this step reaches
  (bench/step_time_check.py measures it from a real DeepSpeed step), not a large copy's.

Overlap: none, except that with ``"overlap_comm": true`` (ZeRO 1/2) the gradient reduction (half the gradient bytes)
hides behind the backward (the compute after the first forward) as far as it fits. Blind to: routing imbalance (the busiest
expert sets the pace), ranks waiting for each other at the collectives (stragglers), an optimizer rate that changes
with the parameter count, kernel efficiency at small shapes and the host's overheads (large on CPU), pipeline and
tensor parallelism, FP8, optimizer offload (its CPU Adam is not modelled: no prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

from .clusters import Cluster

ADAM_BYTES_PER_PARAMETER = 32
ENGINE_BYTES_PER_LOCAL_PARAMETER = 16


@dataclass(frozen=True)
class StepTime:
    """One optimizer step's predicted seconds per part (on every rank: even routing makes the ranks alike)."""

    compute: float
    all_to_all: float
    gradients: float      # exposed (after any overlap with the backward)
    optimizer: float
    tokens_per_step: int  # all ranks
    flops_per_token: float
    world_size: int
    peak_flops: float

    @property
    def total(self) -> float:
        return self.compute + self.all_to_all + self.gradients + self.optimizer

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / self.total

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recompute) per second over the ranks' datasheet peak."""
        return self.tokens_per_sec * self.flops_per_token / (self.world_size * self.peak_flops)

    def shares(self) -> dict[str, float]:
        return {part: getattr(self, part) / self.total for part in ("compute", "all_to_all", "gradients", "optimizer")}

    def as_dict(self) -> dict:
        return {"seconds": {part: getattr(self, part) for part in ("compute", "all_to_all", "gradients", "optimizer")},
                "step_time": self.total, "tokens_per_sec": self.tokens_per_sec, "mfu": self.mfu,
                "shares": self.shares()}


def ring_seconds(bytes_per_rank: float, ranks: int, bandwidth: float, latency: float) -> float:
    """A ring all-reduce (or reduce-scatter + all-gather) of ``bytes_per_rank`` over ``ranks``: 2 (n - 1) / n of the
    bytes through each rank's link, and 2 (n - 1) latency-bound hops."""
    if ranks <= 1 or bytes_per_rank == 0:
        return 0.0
    return 2 * (ranks - 1) / ranks * bytes_per_rank / bandwidth + 2 * (ranks - 1) * latency


def all_to_all_split(bytes_per_step: float, ep_size: int, devices_per_node: int) -> tuple[float, float]:
    """(in node, across nodes): ``bytes_per_step`` sent to the ep_size - 1 peers in equal parts; the group's ranks
    are consecutive, so min(ep_size, devices per node) - 1 of them share this rank's node."""
    if ep_size <= 1:
        return 0.0, 0.0
    in_node = min(ep_size, devices_per_node) - 1
    per_peer = bytes_per_step / (ep_size - 1)
    return per_peer * in_node, per_peer * (ep_size - 1 - in_node)


def all_to_all_seconds(bytes_per_step: float, exchanges: int, ep_size: int, cluster: Cluster) -> float:
    """The expert-parallel exchanges of one step: the in-node part over NVLink and the cross-node part over the
    network at once, plus a latency per exchange."""
    if ep_size <= 1:
        return 0.0
    in_node, across = all_to_all_split(bytes_per_step, ep_size, cluster.devices_per_node)
    transfer = max(in_node / cluster.intra_node_bandwidth, across / cluster.inter_node_bandwidth)
    latency = cluster.inter_node_latency if across else cluster.intra_node_latency
    return transfer + exchanges * latency


def node_once_seconds(split: tuple[float, float], forwards: int, moe_layers: int, accumulation: int,
                      cluster: Cluster) -> float:
    """--dispatcher node_once's exchanges of one step: across nodes, then inside, one after the other; per layer and
    forward 4 exchanges across (counts, rows, route values, the sums back) and 3 inside (counts, rows, outputs
    back), per backward 3 and 2."""
    in_node, across = split
    exchanges_across = moe_layers * (4 * forwards + 3) * accumulation
    exchanges_in = moe_layers * (3 * forwards + 2) * accumulation
    return (across / cluster.inter_node_bandwidth + exchanges_across * cluster.inter_node_latency
            + in_node / cluster.intra_node_bandwidth + exchanges_in * cluster.intra_node_latency)


def predict(shape, setup, ds_config: dict, cluster: Cluster, all_to_all_bytes: float,
            split: tuple[float, float] | None = None) -> StepTime | None:
    """The step time of ``setup`` (training/preflight.Setup) for the model ``shape`` on ``cluster``; None with
    optimizer offload (not modelled). ``all_to_all_bytes``: the plan's bytes one rank sends per step; ``split``:
    those (in node, across nodes), which --dispatcher node_once needs (without it, the per-route model)."""
    if setup.offload_optimizer:
        return None
    W, P = setup.world_size, setup.ep_size
    tokens = setup.micro_batch * setup.block_size * setup.gradient_accumulation_steps
    recompute = 4 / 3 if setup.activation_checkpointing else 1.0
    compute = tokens * shape.flops_per_token * recompute / cluster.matmul_flops

    forwards = 2 if setup.activation_checkpointing else 1  # the recompute is a forward again
    exchanges = shape.moe_layers * (3 * forwards + 2) * setup.gradient_accumulation_steps
    all_to_all = all_to_all_seconds(all_to_all_bytes, exchanges, P, cluster)
    if setup.dispatcher == "node_once" and split is not None and split[1] > 0:
        all_to_all = node_once_seconds(split, forwards, shape.moe_layers, setup.gradient_accumulation_steps, cluster)

    width = 2 if setup.bf16 else 4
    spans_nodes = W > cluster.devices_per_node
    link = (cluster.inter_node_bandwidth, cluster.inter_node_latency) if spans_nodes else \
        (cluster.intra_node_bandwidth, cluster.intra_node_latency)
    # The expert-data-parallel group (ranks i, i + P, ...) leaves the node as soon as the world does, unless P = 1
    # (then it is the whole world) or the group has one rank.
    dense = ring_seconds(shape.dense_parameters * width, W, *link)
    experts = ring_seconds(shape.expert_parameters / P * width, W // P, *link)
    gradients = dense + experts
    if setup.zero_stage in (1, 2) and ds_config.get("zero_optimization", {}).get("overlap_comm", False):
        backward = compute - tokens * shape.flops_per_token / 3 / cluster.matmul_flops  # all but the first forward
        gradients = gradients / 2 + max(0.0, gradients / 2 - backward)

    local = shape.dense_parameters + shape.expert_parameters / P
    partition = local if setup.zero_stage == 0 else \
        shape.dense_parameters / W + shape.expert_parameters / P / (W // P)
    optimizer = (partition * ADAM_BYTES_PER_PARAMETER + local * ENGINE_BYTES_PER_LOCAL_PARAMETER) / \
        cluster.memory_bandwidth
    return StepTime(compute=compute, all_to_all=all_to_all, gradients=gradients, optimizer=optimizer,
                    tokens_per_step=tokens * W, flops_per_token=shape.flops_per_token, world_size=W,
                    peak_flops=cluster.peak_flops)
