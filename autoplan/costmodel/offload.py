"""Offloading to host memory (Plan.offload): what moves to the host, what the host link carries, and what the
CPU computes.

| offload   | on the host, per rank                                   | as in                                        |
|-----------|---------------------------------------------------------|----------------------------------------------|
| optimizer | fp32 master weights and both moments of the rank's      | ZeRO-Offload (Ren et al. 2021, USENIX ATC,   |
|           | optimizer shard (12 B/param); the Adam step on the CPU  | Sec. 4.1: optimizer states and step on CPU)  |
| params    | also the sharded bf16 parameters and gradients          | FSDP2 `CPUOffloadPolicy` (torch docs), ZeRO-3 |
|           | (2 + 2 B/param of the shard); zero_stage 3 only         | with offload_param (ZeRO-Infinity, Sec. 5)   |

Host link traffic per step (executor.offload, FSDP2): with `optimizer`, the shard's bf16 gradients down and
its updated bf16 parameters up, 2 + 2 B/param, once per step; with `params`, each FSDP all-gather first
copies the rank's bf16 shard up (forward and, resharded, backward: every micro-batch) and each
reduce-scatter's bf16 shard goes down. The CPU step streams ADAM_STEP_BYTES per parameter of the shard
through host DRAM, whose bandwidth the node's GPUs share.
"""

from __future__ import annotations

from autoplan.costmodel.memory import ADAM_STEP_BYTES, GRAD_BYTES, OPTIMIZER_BYTES, PARAM_BYTES
from autoplan.schema import Cluster, Plan


def host_state_bytes(*, optimizer_shard_params: float, sharded_params: float, plan: Plan) -> float:
    """Bytes one rank keeps in host memory: 12 B per parameter of its optimizer shard when anything is
    offloaded (ZeRO paper's K = 12), plus 2 + 2 B per parameter of its FSDP shard with offload=params."""
    if plan.offload == "none":
        return 0.0
    host = OPTIMIZER_BYTES * optimizer_shard_params
    if plan.offload == "params":
        host += (PARAM_BYTES + GRAD_BYTES) * sharded_params
    return host


def host_link_s(*, message_bytes: float, cluster: Cluster) -> float:
    """α + M / B over the host link of one GPU (PCIe or NVLink-C2C, one direction). Ignores GPUs sharing a
    PCIe switch's uplink (the preset's bandwidth is per GPU as the datasheets give it)."""
    if message_bytes <= 0:
        return 0.0
    link = cluster.host_link
    if link is None:
        return float("inf")
    return link.latency_s + message_bytes / link.bandwidth_bytes_per_s


def cpu_adam_s(*, shard_params: float, cluster: Cluster) -> float:
    """ADAM_STEP_BYTES · P / (B_host / GPUs per node · efficiency): the Adam step of one rank's shard on the
    CPU, at its share of the node's host (DRAM bandwidth B_host and the cores that stream it; a rank alone on
    a node gets no more: the executor's CPU step is bound by the cores one process uses, benchmarks/results/
    gpu_one_h200_offload.md). The presets' efficiency is what the executor's step measured on a 16-core
    share."""
    if shard_params <= 0:
        return 0.0
    if cluster.host_memory_bandwidth_bytes_per_s <= 0:
        return float("inf")
    sharing = cluster.gpus_per_node
    bandwidth = cluster.host_memory_bandwidth_bytes_per_s / sharing * cluster.cpu_optimizer_efficiency
    return ADAM_STEP_BYTES * shard_params / bandwidth


def offloaded_step_s(*, shard_params: float, plan: Plan, cluster: Cluster) -> float:
    """Seconds of the optimizer step of an offloading plan, all on the critical path as executor.offload
    runs it, parameter by parameter: gradients down (2 B/param; with offload=params FSDP has already put
    them on the host), the CPU's Adam, parameters up (2 B/param; with offload=params they stay on the host
    until the next all-gather). ZeRO-Offload hides the gradient copy behind backward and can delay the
    update by one step (its DPU, Sec. 4.2) to hide the rest; the executor does neither."""
    if plan.offload == "none":
        return 0.0
    step = cpu_adam_s(shard_params=shard_params, cluster=cluster)
    if plan.offload == "optimizer":
        step += host_link_s(message_bytes=GRAD_BYTES * shard_params, cluster=cluster)
        step += host_link_s(message_bytes=PARAM_BYTES * shard_params, cluster=cluster)
    return step


def fsdp_offload_copies_s(*, shard_params: float, gathers: int, reduces: int, cluster: Cluster) -> float:
    """Host-link seconds per step of FSDP2's CPUOffloadPolicy: `gathers` copies of the rank's bf16 shard up
    (one before each all-gather) and `reduces` of its reduced bf16 gradient shard down (torch docs,
    CPUOffloadPolicy); on the copy stream, so they overlap compute as the collectives do."""
    return (gathers * host_link_s(message_bytes=PARAM_BYTES * shard_params, cluster=cluster)
            + reduces * host_link_s(message_bytes=GRAD_BYTES * shard_params, cluster=cluster))
