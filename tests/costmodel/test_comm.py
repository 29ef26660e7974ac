"""Collectives on a topology: worked examples of the alpha-beta formulas, limit cases, placement."""

import pytest

from autoplan.costmodel.comm import (
    GroupTopology,
    all_to_all_s,
    axis_stride,
    group_all_gather_s,
    group_all_reduce_s,
    group_all_to_all_s,
    group_reduce_scatter_s,
    group_topology,
    p2p_between_stages_s,
    p2p_s,
    ring_all_gather_s,
    ring_all_reduce_s,
    ring_reduce_scatter_s,
)
from autoplan.schema import Cluster, EfficiencyPoint, Link

GB = 1e9
FAST = Link(bandwidth_bytes_per_s=100 * GB, latency_s=0.0)   # NVLink-like, alpha 0 for clean arithmetic
SLOW = Link(bandwidth_bytes_per_s=25 * GB, latency_s=0.0)    # InfiniBand-like, per GPU


def make_cluster(*, intra: Link = FAST, inter: Link = SLOW, gpus_per_node: int = 8, num_gpus: int = 16) -> Cluster:
    return Cluster(
        name="test", gpu="test-gpu", num_gpus=num_gpus, gpus_per_node=gpus_per_node,
        peak_flops_per_s=1e15, memory_bytes=80 * 2**30, memory_bandwidth_bytes_per_s=3e12,
        memory_reserve_bytes=2 * 2**30, intra_node=intra, inter_node=inter,
        gemm_efficiency=[EfficiencyPoint(flops=1e12, efficiency=0.7)],
        attention_efficiency=0.5, memory_bound_efficiency=0.7,
    )


# ----------------------------------------------------------------------------------------- one link
def test_ring_all_reduce_worked_example():
    """Oracle: ring all-reduce 2(n-1)α + 2(n-1)/n·M/B (Thakur et al. 2005; NCCL busbw = algbw·2(n-1)/n)."""
    # 1 GB over 8 GPUs at 100 GB/s, α = 0: 2·7/8 · 1e9/1e11 = 0.0175 s
    assert ring_all_reduce_s(message_bytes=1 * GB, group_size=8, link=FAST) == pytest.approx(0.0175)
    # α = 5 µs adds 2·7·5e-6 = 7e-5 s
    link = Link(bandwidth_bytes_per_s=100 * GB, latency_s=5e-6)
    assert ring_all_reduce_s(message_bytes=1 * GB, group_size=8, link=link) == pytest.approx(0.0175 + 7e-5)


def test_ring_all_gather_and_reduce_scatter_worked_example():
    """Oracle: ring all-gather / reduce-scatter (n-1)α + (n-1)/n·M/B with M the full tensor (Thakur et al. 2005)."""
    link = Link(bandwidth_bytes_per_s=100 * GB, latency_s=1e-5)
    # 1 GB over 4 GPUs: 3·1e-5 + 3/4 · 1e9/1e11 = 3e-5 + 0.0075 = 0.00753 s
    assert ring_all_gather_s(message_bytes=1 * GB, group_size=4, link=link) == pytest.approx(0.00753)
    assert ring_reduce_scatter_s(message_bytes=1 * GB, group_size=4, link=link) == pytest.approx(0.00753)


def test_all_reduce_is_reduce_scatter_plus_all_gather():
    """Oracle: the ring all-reduce is a ring reduce-scatter followed by a ring all-gather (Thakur et al. 2005)."""
    link = Link(bandwidth_bytes_per_s=50 * GB, latency_s=3e-6)
    rs = ring_reduce_scatter_s(message_bytes=3 * GB, group_size=6, link=link)
    ag = ring_all_gather_s(message_bytes=3 * GB, group_size=6, link=link)
    assert ring_all_reduce_s(message_bytes=3 * GB, group_size=6, link=link) == pytest.approx(rs + ag)


def test_all_to_all_and_p2p_worked_examples():
    """Oracle: pairwise all-to-all (n-1)α + (n-1)/n·M/B (Thakur et al. 2005); p2p α + M/B (Hockney)."""
    # each rank sends 1 GB in total over 8 ranks: 7/8 · 1e9/1e11 = 0.00875 s
    assert all_to_all_s(message_bytes=1 * GB, group_size=8, link=FAST) == pytest.approx(0.00875)
    # 100 MB at 100 GB/s with α = 10 µs: 1e-5 + 1e8/1e11 = 0.00101 s
    link = Link(bandwidth_bytes_per_s=100 * GB, latency_s=1e-5)
    assert p2p_s(message_bytes=1e8, link=link) == pytest.approx(0.00101)


def test_group_of_one_costs_nothing():
    """Oracle: limit case, a group of one rank communicates nothing (0 s, even with α > 0)."""
    link = Link(bandwidth_bytes_per_s=1 * GB, latency_s=1e-3)
    for fn in (ring_all_reduce_s, ring_all_gather_s, ring_reduce_scatter_s, all_to_all_s):
        assert fn(message_bytes=1 * GB, group_size=1, link=link) == 0.0
    cluster = make_cluster(intra=link, inter=link)
    one = group_topology(group_size=1, stride=8, gpus_per_node=8)
    for fn in (group_all_reduce_s, group_all_gather_s, group_reduce_scatter_s, group_all_to_all_s):
        assert fn(message_bytes=1 * GB, topo=one, cluster=cluster) == 0.0


# ----------------------------------------------------------------------------------------- placement
def test_tp_group_of_eight_is_inside_one_node():
    """Oracle: rank layout ((pp*dp+dp)*cp+cp)*tp+tp: tp=8 is ranks 0..7, one 8-GPU node."""
    assert group_topology(group_size=8, stride=1, gpus_per_node=8) == GroupTopology(8, 8, 1)


def test_dp_group_of_stride_eight_crosses_nodes():
    """Oracle: with tp=8 a dp group is ranks 0, 8, 16, 24: one rank on each of 4 nodes."""
    stride = axis_stride(axis="dp", tp=8, cp=1, dp=4)
    assert stride == 8
    assert group_topology(group_size=4, stride=stride, gpus_per_node=8) == GroupTopology(4, 1, 4)


def test_partial_node_group():
    """Oracle: ranks 0, 2, ..., 14 on 8-GPU nodes: 4 on node 0 (0,2,4,6) and 4 on node 1."""
    assert group_topology(group_size=8, stride=2, gpus_per_node=8) == GroupTopology(8, 4, 2)
    assert group_topology(group_size=4, stride=2, gpus_per_node=8) == GroupTopology(4, 4, 1)


def test_axis_strides_follow_the_layout():
    """Oracle: layout ((pp_i*dp + dp_i)*cp + cp_i)*tp + tp_i: strides tp 1, cp tp, dp tp*cp, pp tp*cp*dp, ep 1."""
    kw = dict(tp=4, cp=2, dp=3)
    assert [axis_stride(axis=a, **kw) for a in ("tp", "cp", "dp", "pp", "ep")] == [1, 4, 8, 24, 1]
    with pytest.raises(ValueError):
        axis_stride(axis="xx", **kw)


# ----------------------------------------------------------------------------------------- on a topology
def test_intra_node_group_uses_ring_on_intra_link():
    """Oracle: a group inside one node is a plain ring on the intra-node link."""
    cluster = make_cluster()
    topo = group_topology(group_size=8, stride=1, gpus_per_node=8)
    assert group_all_reduce_s(message_bytes=GB, topo=topo, cluster=cluster) == pytest.approx(0.0175)
    assert group_all_gather_s(message_bytes=GB, topo=topo, cluster=cluster) == pytest.approx(0.00875)
    assert group_all_to_all_s(message_bytes=GB, topo=topo, cluster=cluster) == pytest.approx(0.00875)


def test_hierarchical_all_reduce_two_nodes_of_eight():
    """Oracle: hierarchical all-reduce (Jia et al. 2018; 2D-Torus, Mikami et al. 2018): RS in node,
    AR of M/r across nodes, AG in node; cheaper than a flat ring over the inter-node link."""
    cluster = make_cluster()
    topo = group_topology(group_size=16, stride=1, gpus_per_node=8)
    assert topo == GroupTopology(16, 8, 2)
    # in node:  2 · 7/8 · 1e9/1e11       = 0.0175 s (reduce-scatter + all-gather)
    # across:   2 · 1/2 · 1.25e8/2.5e10  = 0.005 s  (all-reduce of M/8 over 2 nodes)
    got = group_all_reduce_s(message_bytes=GB, topo=topo, cluster=cluster)
    assert got == pytest.approx(0.0225)
    # flat ring of 16 on the inter-node link: 2 · 15/16 · 1e9/2.5e10 = 0.075 s
    flat = ring_all_reduce_s(message_bytes=GB, group_size=16, link=SLOW)
    assert flat == pytest.approx(0.075)
    assert got < flat


def test_one_rank_per_node_is_a_flat_inter_node_ring():
    """Oracle: with ranks_per_node = 1 the hierarchical algorithm degenerates to a ring across nodes."""
    inter = Link(bandwidth_bytes_per_s=25 * GB, latency_s=1e-5)
    cluster = make_cluster(inter=inter, num_gpus=32)
    topo = group_topology(group_size=4, stride=8, gpus_per_node=8)
    assert group_all_reduce_s(message_bytes=GB, topo=topo, cluster=cluster) == pytest.approx(
        ring_all_reduce_s(message_bytes=GB, group_size=4, link=inter))
    assert group_all_gather_s(message_bytes=GB, topo=topo, cluster=cluster) == pytest.approx(
        ring_all_gather_s(message_bytes=GB, group_size=4, link=inter))
    assert group_all_to_all_s(message_bytes=GB, topo=topo, cluster=cluster) == pytest.approx(
        all_to_all_s(message_bytes=GB, group_size=4, link=inter))


def test_two_level_all_gather_and_reduce_scatter():
    """Oracle: two-level all-gather (inter-node AG of M/r, then intra-node AG of M), Jia et al. 2018."""
    cluster = make_cluster()
    topo = GroupTopology(group_size=16, ranks_per_node=8, nodes=2)
    # across: 1/2 · 1.25e8/2.5e10 = 0.0025 s; in node: 7/8 · 1e9/1e11 = 0.00875 s; total 0.01125 s
    assert group_all_gather_s(message_bytes=GB, topo=topo, cluster=cluster) == pytest.approx(0.01125)
    assert group_reduce_scatter_s(message_bytes=GB, topo=topo, cluster=cluster) == pytest.approx(0.01125)


def test_all_to_all_across_nodes_is_bound_by_the_slower_part():
    """Oracle: all-to-all split into intra-node and inter-node traffic running concurrently (max of the two)
    plus one α per peer (pairwise exchange, Thakur et al. 2005)."""
    intra = Link(bandwidth_bytes_per_s=100 * GB, latency_s=1e-6)
    inter = Link(bandwidth_bytes_per_s=25 * GB, latency_s=1e-5)
    cluster = make_cluster(intra=intra, inter=inter)
    topo = GroupTopology(group_size=16, ranks_per_node=8, nodes=2)
    # in node: 7/16 · 1e9/1e11 = 0.004375 s; across: 1/2 · 1e9/2.5e10 = 0.02 s; max = 0.02 s
    # latency: 7·1e-6 + 8·1e-5 = 8.7e-5 s
    got = group_all_to_all_s(message_bytes=GB, topo=topo, cluster=cluster)
    assert got == pytest.approx(0.02 + 8.7e-5)


def test_p2p_between_stages_picks_the_link():
    """Oracle: nodes hold gpus_per_node consecutive ranks; a neighbour stage closer than that is on the node."""
    intra = Link(bandwidth_bytes_per_s=100 * GB, latency_s=1e-6)
    inter = Link(bandwidth_bytes_per_s=25 * GB, latency_s=1e-5)
    cluster = make_cluster(intra=intra, inter=inter)
    # 100 MB: in node 1e-6 + 1e8/1e11 = 0.001001 s; across 1e-5 + 1e8/2.5e10 = 0.00401 s
    assert p2p_between_stages_s(message_bytes=1e8, stage_stride_ranks=4, cluster=cluster) == pytest.approx(0.001001)
    assert p2p_between_stages_s(message_bytes=1e8, stage_stride_ranks=8, cluster=cluster) == pytest.approx(0.00401)
