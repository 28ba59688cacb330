"""The machines a plan predicts step time for (`train.py --plan --plan_cluster NAME_OR_FILE`): named presets with
their sources, or a user's own JSON file with the same fields (docs/multi-node.md#choosing-a-layout).

Bandwidths are one direction, per device: what one GPU can send to the others of its node over NVLink, and to other
nodes over its share of the node's network cards. The datasheet figures are link peaks; NCCL reaches less of them
(its bus bandwidth), so a measured figure (bench/step_time_check.py measures this machine's) is better where known.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..run.config import ConfigError

GB = 1e9
SUSTAINED_SHARE = 0.7  # an assumption, not a measurement: large bf16 GEMMs on H100/A100 reach roughly this share
#                        of the datasheet peak; a user's file (or a calibrated one) replaces it


@dataclass(frozen=True)
class Cluster:
    """One kind of node and how its devices talk. Rates in FLOP/s and bytes/s, latencies in seconds."""

    name: str
    devices_per_node: int
    memory_gib: float             # one device's memory (what a layout must fit)
    peak_flops: float             # the datasheet's dense peak in the training dtype: what MFU is measured against
    matmul_flops: float           # the sustained rate of the model's matrix multiplications on one device
    memory_bandwidth: float       # one device's memory bandwidth (the optimizer step is bound by it)
    intra_node_bandwidth: float   # bytes/s one device sends to the others of its node
    intra_node_latency: float     # seconds per collective inside a node
    inter_node_bandwidth: float   # bytes/s one device sends to other nodes
    inter_node_latency: float     # seconds per collective across nodes
    bf16: bool = True             # what "bf16": "auto" gives on these devices (True for every preset)
    source: str = ""

    @classmethod
    def from_file(cls, path: Path) -> Cluster:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError([f"--plan_cluster {path}: cannot read it as JSON ({err})"]) from err
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name != "name"]
        missing = [name for name in required if name not in values]
        unknown = [key for key in values if key not in names]
        if missing or unknown:
            raise ConfigError([f"--plan_cluster {path}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unknown {', '.join(unknown)}"] if unknown else []))
                + f" (the fields: {', '.join(names)}; docs/multi-node.md#choosing-a-layout)"])
        cluster = cls(**{"name": Path(path).stem, **values})
        bad = [f.name for f in dataclasses.fields(cls)
               if f.name not in ("name", "source", "bf16") and not getattr(cluster, f.name) > 0]
        if bad:
            raise ConfigError([f"--plan_cluster {path}: {', '.join(bad)} must be > 0"])
        return cluster


def _nvidia(name: str, peak_tflops: float, memory_gib: float, memory_tb_s: float, nvlink_gb_s: float,
            network_gb_s: float, source: str) -> Cluster:
    return Cluster(name=name, devices_per_node=8, memory_gib=memory_gib, peak_flops=peak_tflops * 1e12,
                   matmul_flops=SUSTAINED_SHARE * peak_tflops * 1e12, memory_bandwidth=memory_tb_s * 1e12,
                   intra_node_bandwidth=nvlink_gb_s * GB, intra_node_latency=10e-6,
                   inter_node_bandwidth=network_gb_s * GB, inter_node_latency=20e-6, source=source)


# Latencies (10 us in a node, 20 us across) are assumed orders of magnitude of NCCL's small-message times, not
# measurements. NVLink figures are the datasheets' bidirectional totals halved (one direction).
PRESETS: dict[str, Cluster] = {cluster.name: cluster for cluster in [
    _nvidia("h100-sxm-ib400", 989.0, 80, 3.35, 450, 50,
            "NVIDIA H100 SXM datasheet (989 TFLOPS bf16 dense, 3.35 TB/s, NVLink 900 GB/s); DGX H100: one 400 Gb/s "
            "ConnectX-7 InfiniBand port per GPU"),
    _nvidia("h200-sxm-ib400", 989.0, 141, 4.8, 450, 50,
            "NVIDIA H200 SXM datasheet (989 TFLOPS bf16 dense, 141 GB, 4.8 TB/s, NVLink 900 GB/s); one 400 Gb/s "
            "InfiniBand port per GPU, as in DGX H200"),
    _nvidia("h800-ib400", 989.0, 80, 3.35, 160, 50,
            "DeepSeek-V3 technical report (arXiv 2412.19437, section 3.1): H800 nodes of 8, NVLink 160 GB/s, "
            "InfiniBand 50 GB/s per GPU; H800 compute as H100 SXM"),
    _nvidia("a100-sxm-ib200", 312.0, 80, 2.04, 300, 25,
            "NVIDIA A100 80GB SXM datasheet (312 TFLOPS bf16 dense, 2.04 TB/s, NVLink 600 GB/s); DGX A100: one "
            "200 Gb/s HDR InfiniBand port per GPU"),
]}


def resolve_cluster(name_or_file: str) -> Cluster:
    """A preset by name, else a JSON file of ``Cluster``'s fields."""
    if name_or_file in PRESETS:
        return PRESETS[name_or_file]
    if Path(name_or_file).suffix == ".json" or Path(name_or_file).exists():
        return Cluster.from_file(Path(name_or_file))
    raise ConfigError([f"--plan_cluster {name_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON "
                       "file; see docs/multi-node.md#choosing-a-layout for the file's fields"])


def plan_problems(train) -> list[str]:
    """The plan's cluster flags (TrainConfig): each needs the one before it, and the cluster must resolve."""
    problems = []
    if not train.plan and (train.plan_cluster or train.plan_search or train.plan_nodes != 1):
        problems.append("--plan_cluster, --plan_nodes and --plan_search only apply with --plan")
    if train.plan_search and not train.plan_cluster:
        problems.append("--plan_search needs --plan_cluster (the machines whose step time ranks the layouts)")
    if train.plan_nodes < 1:
        problems.append(f"plan_nodes ({train.plan_nodes}) must be >= 1")
    if train.plan_cluster:
        try:
            cluster = resolve_cluster(train.plan_cluster)
        except ConfigError as err:
            return problems + err.problems
        world = train.plan_nodes * cluster.devices_per_node
        if train.plan_world_size is not None and train.plan_world_size != world:
            problems.append(f"--plan_world_size {train.plan_world_size} disagrees with --plan_cluster "
                            f"{train.plan_cluster} x --plan_nodes {train.plan_nodes} ({world} ranks); give one of them")
    return problems


def planned_world_size(train, launched: int) -> int:
    """The ranks a plan is for: the cluster's nodes x devices per node with --plan_cluster, else --plan_world_size,
    else the launched ones."""
    if train.plan_cluster:
        return train.plan_nodes * resolve_cluster(train.plan_cluster).devices_per_node
    return train.plan_world_size or launched
