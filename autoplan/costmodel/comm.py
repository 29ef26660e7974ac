"""Collectives on a topology: alpha-beta ring formulas on one link, and their two-level versions.

Rank layout (the executor uses the same): mesh axes ordered ("pp", "dp", "cp", "tp"), tp innermost,

    global rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i

so a tp group has rank stride 1, cp stride tp, dp stride tp*cp, pp stride tp*cp*dp; the expert-parallel
group (folded over the dp*cp*tp ranks) is ep consecutive ranks, stride 1. A node holds
`cluster.gpus_per_node` consecutive ranks.

Message sizes: M is the FULL (unsharded) tensor for all-reduce, all-gather and reduce-scatter, and the
bytes one rank sends in total (its own share included) for all-to-all. A Link's bandwidth is the
achievable per-GPU bus bandwidth (NCCL's busbw), its latency the alpha of the alpha-beta model.
Every formula ignores contention between groups that share a link and NCCL's protocol/chunking
choices (LL/LL128/Simple); group_size 1 costs 0 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoplan.schema import Cluster, Link

AXIS_ORDER = ("pp", "dp", "cp", "tp")  # outermost first; tp is innermost (stride 1)


@dataclass(frozen=True)
class GroupTopology:
    """Where one process group's members sit: `nodes` nodes with `ranks_per_node` members in each."""

    group_size: int
    ranks_per_node: int
    nodes: int

    @property
    def intra_node(self) -> bool:
        return self.nodes == 1


def axis_stride(*, axis: str, tp: int, cp: int, dp: int) -> int:
    """Rank stride of a mesh axis in the layout above: tp 1, cp tp, dp tp*cp, pp tp*cp*dp, ep 1."""
    strides = {"tp": 1, "ep": 1, "cp": tp, "dp": tp * cp, "pp": tp * cp * dp}
    if axis not in strides:
        raise ValueError(f"unknown mesh axis {axis!r}; expected one of tp, cp, dp, pp, ep")
    return strides[axis]


def group_topology(*, group_size: int, stride: int, gpus_per_node: int) -> GroupTopology:
    """How a group of `group_size` ranks spaced `stride` apart falls onto nodes of `gpus_per_node` ranks.

    stride·n <= gpus_per_node: the whole group is in one node. Otherwise
    ranks_per_node = min(n, max(1, gpus_per_node // stride)) and nodes = ceil(n / ranks_per_node).
    Assumes groups are aligned to node boundaries (true when the degrees divide gpus_per_node or
    are multiples of it, as with power-of-two degrees on 8-GPU nodes).
    """
    if group_size <= 1:
        return GroupTopology(group_size=1, ranks_per_node=1, nodes=1)
    if stride * group_size <= gpus_per_node:
        return GroupTopology(group_size=group_size, ranks_per_node=group_size, nodes=1)
    ranks_per_node = min(group_size, max(1, gpus_per_node // stride))
    return GroupTopology(group_size=group_size, ranks_per_node=ranks_per_node,
                         nodes=math.ceil(group_size / ranks_per_node))


# ----------------------------------------------------------------------------------------- one link
def ring_all_reduce_s(*, message_bytes: float, group_size: int, link: Link) -> float:
    """2(n-1)·α + 2(n-1)/n · M/B, M the full buffer: ring reduce-scatter then ring all-gather
    (Thakur, Rabenseifner & Gropp 2005; NCCL docs "Performance": all-reduce busbw = algbw · 2(n-1)/n).
    Ignores the reduction's compute time."""
    n = group_size
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * message_bytes / link.bandwidth_bytes_per_s


def ring_all_gather_s(*, message_bytes: float, group_size: int, link: Link) -> float:
    """(n-1)·α + (n-1)/n · M/B, M the full gathered output (ring algorithm: Thakur, Rabenseifner & Gropp
    2005; NCCL docs: all-gather busbw = algbw · (n-1)/n)."""
    n = group_size
    if n <= 1:
        return 0.0
    return (n - 1) * link.latency_s + (n - 1) / n * message_bytes / link.bandwidth_bytes_per_s


def ring_reduce_scatter_s(*, message_bytes: float, group_size: int, link: Link) -> float:
    """(n-1)·α + (n-1)/n · M/B, M the full input before scattering (ring algorithm: Thakur, Rabenseifner &
    Gropp 2005; NCCL docs: reduce-scatter busbw = algbw · (n-1)/n). Ignores the reduction's compute."""
    return ring_all_gather_s(message_bytes=message_bytes, group_size=group_size, link=link)


def all_to_all_s(*, message_bytes: float, group_size: int, link: Link) -> float:
    """(n-1)·α + (n-1)/n · M/B, M the bytes one rank sends in total (its own M/n share included), by
    pairwise exchange in n-1 steps (Thakur, Rabenseifner & Gropp 2005; NCCL docs: all-to-all
    busbw = algbw · (n-1)/n). Ignores routing imbalance (equal shares to every peer)."""
    n = group_size
    if n <= 1:
        return 0.0
    return (n - 1) * link.latency_s + (n - 1) / n * message_bytes / link.bandwidth_bytes_per_s


def p2p_s(*, message_bytes: float, link: Link) -> float:
    """α + M/B for one send/recv of M bytes (the alpha-beta model, Hockney 1994)."""
    return link.latency_s + message_bytes / link.bandwidth_bytes_per_s


# ----------------------------------------------------------------------------------------- on a topology
def group_all_reduce_s(*, message_bytes: float, topo: GroupTopology, cluster: Cluster) -> float:
    """All-reduce of M bytes (full buffer) over a group placed as `topo` says.

    One node: ring on the intra-node link. Spanning k nodes with r members each, the hierarchical
    (2D) algorithm of Jia et al. 2018 ("Highly Scalable Deep Learning Training System with
    Mixed-Precision", hierarchical all-reduce) and Mikami et al. 2018 ("2D-Torus"), as NCCL's trees/rings do:
      1. reduce-scatter of M inside the node over r ranks (intra_node),
      2. all-reduce of M/r across the k nodes, r such rings in parallel, one per GPU's NIC (inter_node),
      3. all-gather of M inside the node (intra_node).
    r = 1 is exactly a flat ring across nodes on inter_node. Ignores NIC sharing with other groups and
    overlap between the three phases.
    """
    if topo.group_size <= 1:
        return 0.0
    if topo.intra_node:
        return ring_all_reduce_s(message_bytes=message_bytes, group_size=topo.group_size, link=cluster.intra_node)
    r = topo.ranks_per_node
    inside_s = ring_reduce_scatter_s(message_bytes=message_bytes, group_size=r, link=cluster.intra_node)
    across_s = ring_all_reduce_s(message_bytes=message_bytes / r, group_size=topo.nodes, link=cluster.inter_node)
    return 2 * inside_s + across_s


def group_all_gather_s(*, message_bytes: float, topo: GroupTopology, cluster: Cluster) -> float:
    """All-gather whose full output is M bytes, over a group placed as `topo` says.

    One node: ring on intra_node. Spanning k nodes with r members each:
      bandwidth: two levels (the all-gather half of the hierarchical all-reduce, Jia et al. 2018):
        1. across the k nodes among ranks of the same local index: output M/r, (k-1)/k·(M/r)/B_e,
        2. inside the node over r ranks: output M, (r-1)/r·M/B_i;
        a ring through all n ranks with one channel per NIC moves the same bytes per link;
      latency: NCCL runs all-gather and reduce-scatter as one ring over all n = k·r ranks (NCCL's
        src/graph/tuning.cc models ring all-gather latency as n-1 steps; there is no tree for them), and
        every step waits for its slowest hop, an inter-node one: (n-1)·α_e.
    Cost (n-1)·α_e + (k-1)/k·(M/r)/B_e + (r-1)/r·M/B_i; r = 1 is a flat inter-node ring.
    Ignores NIC sharing with other groups and overlap between the two levels.
    """
    if topo.group_size <= 1:
        return 0.0
    if topo.intra_node:
        return ring_all_gather_s(message_bytes=message_bytes, group_size=topo.group_size, link=cluster.intra_node)
    r, k = topo.ranks_per_node, topo.nodes
    across_s = (k - 1) / k * message_bytes / r / cluster.inter_node.bandwidth_bytes_per_s
    inside_s = (r - 1) / r * message_bytes / cluster.intra_node.bandwidth_bytes_per_s
    return (topo.group_size - 1) * cluster.inter_node.latency_s + across_s + inside_s


def group_reduce_scatter_s(*, message_bytes: float, topo: GroupTopology, cluster: Cluster) -> float:
    """Reduce-scatter of a full M-byte input over a group placed as `topo` says: the all-gather of
    `group_all_gather_s` run in reverse (reduce-scatter of M inside the node, then of M/r across
    nodes), so the same cost (Jia et al. 2018). Ignores the reduction's compute time."""
    return group_all_gather_s(message_bytes=message_bytes, topo=topo, cluster=cluster)


def group_all_to_all_s(*, message_bytes: float, topo: GroupTopology, cluster: Cluster) -> float:
    """All-to-all where each rank sends M bytes in total (M/n to each of n members, itself included).

    One node: `all_to_all_s` on intra_node. Spanning k nodes with r members each, each rank sends
    (r-1)/n·M to node-mates over intra_node and (n-r)/n·M = (k-1)/k·M to other nodes over inter_node.
    Assumption: the two parts run concurrently (NCCL posts all sends at once), so the bandwidth term
    is the max of the two; the latency term is one α per peer, as in pairwise exchange
    (Thakur, Rabenseifner & Gropp 2005):
        (r-1)·α_i + (n-r)·α_e + max((r-1)/n·M/B_i, (k-1)/k·M/B_e).
    Reduces to `all_to_all_s` when k = 1 (on intra_node) or r = 1 (on inter_node). Ignores routing
    imbalance and NIC sharing with other groups.
    """
    n, r = topo.group_size, topo.ranks_per_node
    if n <= 1:
        return 0.0
    if topo.intra_node:
        return all_to_all_s(message_bytes=message_bytes, group_size=n, link=cluster.intra_node)
    intra, inter = cluster.intra_node, cluster.inter_node
    inside_s = (r - 1) / n * message_bytes / intra.bandwidth_bytes_per_s
    across_s = (topo.nodes - 1) / topo.nodes * message_bytes / inter.bandwidth_bytes_per_s
    return (r - 1) * intra.latency_s + (n - r) * inter.latency_s + max(inside_s, across_s)


def p2p_between_stages_s(*, message_bytes: float, stage_stride_ranks: int, cluster: Cluster) -> float:
    """α + M/B for one pipeline send/recv between neighbour stages `stage_stride_ranks` ranks apart
    (tp*cp*dp in the layout above). The neighbour is on the same node when the stride is below
    gpus_per_node (intra_node link), otherwise on another node (inter_node). Ignores the boundary
    ranks of a node whose neighbour happens to sit on the next node (nodes are aligned to groups)."""
    link = cluster.intra_node if stage_stride_ranks < cluster.gpus_per_node else cluster.inter_node
    return p2p_s(message_bytes=message_bytes, link=link)


def overlapped_s(*, comm_s: float, compute_s: float, cluster: Cluster) -> float:
    """Time a collective adds to compute it runs beside: max(0, comm - compute) + κ·min(comm, compute).

    The part longer than the compute is exposed; the overlapped part still slows the compute by κ
    (Cluster.overlap_slowdown): NCCL's kernels occupy SMs (one per channel, 16-32 channels on NVLink
    systems) and share HBM bandwidth with the GEMMs beside them (Rashidi et al. 2021, 'Enabling Compute-
    Communication Overlap in Distributed Deep Learning Training Platforms', ISCA, Sec. 3: overlapped
    compute slows by up to tens of percent). κ = 0 is perfect overlap."""
    return max(0.0, comm_s - compute_s) + cluster.overlap_slowdown * min(comm_s, compute_s)
