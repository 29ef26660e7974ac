"""The MoE layer's costs (costmodel.experts): expert GEMMs under EP (and expert TP), one by one or grouped; the
token dispatcher (all-to-all, all-gather or node-deduplicating) at a routing imbalance that is an input, capped by
token drop; group-limited routing; the dispatcher's overlap; expert tensor parallelism's gather and reduce-scatter."""

import pytest

import autoplan as ap
from autoplan.costmodel import comm
from autoplan.costmodel.experts import (dispatch_s, distinct_destinations, expert_gemm_s, expert_load, expert_tp_s,
                                        fused_moe_kept_bytes_per_token, is_expert_gemm,
                                        node_dedup_all_to_all_s, reachable_nodes)
from autoplan.schema import EfficiencyPoint, GemmShape, Link

GB = 1e9


def _cluster(**update):
    """dgx-h100 with round numbers: 1e15 FLOP/s peak, NVLink 100 GB/s and 1 us, GEMM efficiency 0.2 at 1e9
    FLOPs rising to 0.8 at 1e12 (log-linear)."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=8)
    return cluster.model_copy(update={"peak_flops_per_s": 1e15,
                                      "intra_node": Link(bandwidth_bytes_per_s=100 * GB, latency_s=1e-6),
                                      "gemm_efficiency": [EfficiencyPoint(flops=1e9, efficiency=0.2),
                                                          EfficiencyPoint(flops=1e12, efficiency=0.8)], **update})


def test_all_to_all_dispatch_worked_example():
    """4 all-to-alls of M = T·h bytes · k · imbalance on 8 ranks of a node:
    T·h = 4096 x 4096 x 2 B = 33,554,432 B; k = 2, imbalance 1.25 -> M = 83,886,080 B;
    one = 7·1e-6 + 7/8 · 83,886,080 / 1e11 = 7.40e-4 s; four: 2.9620e-3 s."""
    cluster = _cluster()
    topo = comm.group_topology(group_size=8, stride=1, gpus_per_node=8)
    token_bytes = 4096 * 4096 * 2
    got = dispatch_s(token_bytes=token_bytes, top_k=2, ep=8, imbalance=1.25, dispatcher="all-to-all", topo=topo,
                     cluster=cluster)
    assert got == pytest.approx(4 * (7e-6 + 7 / 8 * token_bytes * 2 * 1.25 / 1e11))
    balanced = dispatch_s(token_bytes=token_bytes, top_k=2, ep=8, imbalance=1.0, dispatcher="all-to-all", topo=topo,
                          cluster=cluster)
    assert got - 4 * 7e-6 == pytest.approx(1.25 * (balanced - 4 * 7e-6))  # the bytes term scales with imbalance


def test_all_gather_dispatch_worked_example():
    """2 x (all-gather + reduce-scatter) of ep·T·h bytes, no imbalance on the link:
    8 x 33,554,432 B = 268,435,456 B; each = 7e-6 + 7/8 · 268,435,456 / 1e11 = 2.3558e-3 s; four: 9.4230e-3 s."""
    cluster = _cluster()
    topo = comm.group_topology(group_size=8, stride=1, gpus_per_node=8)
    token_bytes = 4096 * 4096 * 2
    got = dispatch_s(token_bytes=token_bytes, top_k=8, ep=8, imbalance=3.0, dispatcher="all-gather", topo=topo,
                     cluster=cluster)
    assert got == pytest.approx(4 * (7e-6 + 7 / 8 * 8 * token_bytes / 1e11))


def test_dispatch_limit_cases():
    """ep = 1: nothing to send; an unknown dispatcher is an error."""
    topo = comm.group_topology(group_size=1, stride=1, gpus_per_node=8)
    assert dispatch_s(token_bytes=1e9, top_k=2, ep=1, imbalance=1.1, dispatcher="all-to-all", topo=topo,
                      cluster=_cluster()) == 0.0
    with pytest.raises(ValueError, match="dispatcher"):
        dispatch_s(token_bytes=1e9, top_k=2, ep=2, imbalance=1.1, dispatcher="ring", topo=topo, cluster=_cluster())


def test_expert_gemms_grouped_and_one_by_one_worked_example():
    """128 experts, GEMMs of m = 4096·8/128 = 256 rows per sequence, n = 768, k = 2048, on ep = 8 ranks, 1
    sequence, no tp: 16 local experts, each on 256 x 8 = 2048 rows: 2·2048·768·2048 = 6.4425e9 FLOPs.
    Efficiency at 6.44e9: 0.2 + 0.6·log10(6.44)/3 = 0.3618 -> one GEMM 1.7806e-5 s, 16 of them 2.849e-4 s.
    Grouped: one GEMM of 1.0308e11 FLOPs, efficiency 0.2 + 0.6·log10(103.08)/3 = 0.6026 -> 1.7106e-4 s.
    Both times the imbalance 1.1."""
    cluster = _cluster()
    gemm = GemmShape(m_per_sequence=256, n=768, k=2048, count=128, tp_split="none")
    assert is_expert_gemm(gemm=gemm, num_experts=128)
    kw = dict(gemm=gemm, num_experts=128, ep=8, tokens_split=1, seqs=1, imbalance=1.1, cluster=cluster)
    flops = 2 * 2048 * 768 * 2048
    eff = lambda f: 0.2 + 0.6 * (__import__("math").log10(f) - 9) / 3  # noqa: E731
    assert expert_gemm_s(grouped=False, **kw) == pytest.approx(1.1 * 16 * flops / (1e15 * eff(flops)))
    assert expert_gemm_s(grouped=True, **kw) == pytest.approx(1.1 * 16 * flops / (1e15 * eff(16 * flops)))
    assert expert_gemm_s(grouped=True, **kw) < expert_gemm_s(grouped=False, **kw)


def test_router_and_shared_gemms_are_not_expert_gemms():
    """A GEMM recorded fewer times than there are experts (the router's, a shared expert's) is not one."""
    assert not is_expert_gemm(gemm=GemmShape(m_per_sequence=4096, n=128, k=2048, count=1, tp_split="none"),
                              num_experts=128)


def test_routing_imbalance_is_an_input_of_the_estimate(moe_tiny_profile):
    """Oracle: the layer formulas above. Doubling the imbalance slows the MoE layers (expert GEMMs and the
    all-to-all) and nothing else; the estimate says the imbalance it used."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=8)
    plan = ap.Plan(dp=8, ep=4, global_batch_size=64)
    base = ap.estimate(moe_tiny_profile, cluster, plan)
    skewed = ap.estimate(moe_tiny_profile.model_copy(update={"routing_imbalance": 2.2}), cluster, plan)
    assert skewed.time_breakdown["ep_comm"] > base.time_breakdown["ep_comm"]
    assert skewed.time_breakdown["compute"] > base.time_breakdown["compute"]
    assert skewed.time_breakdown["tp_comm"] == base.time_breakdown["tp_comm"]
    assert any("2.20x" in note for note in skewed.notes)


def test_grouped_gemm_stack_speeds_up_fine_grained_experts():
    """Oracle: expert_gemm_s; 128 experts of qwen3-30b-a3b, ep 8: a stack with grouped GEMMs computes faster."""
    profile = ap.profile_model("qwen3-30b-a3b")
    cluster = ap.Cluster.preset("dgx-h100", gpus=64)
    plan = ap.Plan(dp=64, ep=8, zero_stage=1, global_batch_size=512)
    grouped = ap.Stack.preset("torch").model_copy(update={"grouped_gemm": True})
    one_by_one = ap.estimate(profile, cluster, plan).time_breakdown["compute"]
    assert ap.estimate(profile, cluster, plan, stack=grouped).time_breakdown["compute"] < one_by_one


def test_expert_load_under_token_drop():
    """GShard's capacity (Lepikhin et al. 2020, Sec. 2.2): dropless keeps the imbalance; capacity factor C caps
    it at C; padded to capacity every expert computes exactly C times its balanced share."""
    assert expert_load(imbalance=1.3, capacity_factor=None, pad_to_capacity=False) == 1.3
    assert expert_load(imbalance=1.3, capacity_factor=1.25, pad_to_capacity=False) == 1.25
    assert expert_load(imbalance=1.1, capacity_factor=1.25, pad_to_capacity=False) == 1.1
    assert expert_load(imbalance=1.7, capacity_factor=1.0, pad_to_capacity=True) == 1.0
    assert expert_load(imbalance=1.0, capacity_factor=1.5, pad_to_capacity=True) == 1.5


def test_reachable_nodes_of_group_limited_routing():
    """DeepSeek-V3 (8 groups, 4 per token) at ep 64 on 8-GPU nodes: one group per node, 4 of 8 nodes; at ep 32
    (4 nodes, 2 groups each) no limit; at ep 128 (16 nodes, a group on 2) 8 nodes; no groups: every node."""
    assert reachable_nodes(nodes=8, groups=8, group_top_k=4) == 4
    assert reachable_nodes(nodes=4, groups=8, group_top_k=4) == 4
    assert reachable_nodes(nodes=16, groups=8, group_top_k=4) == 8
    assert reachable_nodes(nodes=8, groups=1, group_top_k=0) == 8


def test_distinct_destinations_worked_example():
    """Occupancy: 8 experts on 4 equally likely nodes reach 4·(1 - (3/4)^8) = 4·(1 - 0.1001129) = 3.5995 nodes;
    one destination or one expert: 1."""
    assert distinct_destinations(top_k=8, choices=4) == pytest.approx(3.59955, rel=1e-5)
    assert distinct_destinations(top_k=8, choices=1) == 1.0
    assert distinct_destinations(top_k=1, choices=64) == pytest.approx(1.0)


def test_node_dedup_dispatch_worked_example():
    """DeepEP-style dispatch of T·h = 2048 x 7168 x 2 B = 29,360,128 B per rank on ep 64 = 8 nodes x 8 ranks,
    top-8, NVLink 100 GB/s (1 us), inter-node 50 GB/s (5 us):
      node-limited to 4 nodes: D_node = 3.59955, D_rank = 32·(1 - (31/32)^8) = 7.17760
        inter = 29,360,128 · 3.59955 · 7/8 / 5e10 = 1.84946e-3 s; intra = 29,360,128 · 7.17760 · 7/8 / 1e11
        = 1.84393e-3 s; one = 7·1e-6 + 56·5e-6 + 1.84946e-3 = 2.13646e-3 s; four of them: 8.5458e-3 s
      the all-to-all dispatcher sends all 8 copies: inter = 29,360,128 · 8 · 7/8 / 5e10 = 4.11042e-3 s."""
    cluster = _cluster(inter_node=Link(bandwidth_bytes_per_s=50 * GB, latency_s=5e-6))
    topo = comm.group_topology(group_size=64, stride=1, gpus_per_node=8)
    token_bytes = 2048 * 7168 * 2
    got = dispatch_s(token_bytes=token_bytes, top_k=8, ep=64, imbalance=1.0, dispatcher="node-dedup", topo=topo,
                     cluster=cluster, reachable_nodes=4)
    assert got == pytest.approx(4 * (7e-6 + 56 * 5e-6 + token_bytes * 3.59955 * 7 / 8 / 5e10), rel=1e-5)
    one_each = node_dedup_all_to_all_s(token_bytes=token_bytes, top_k=8, imbalance=1.0, reachable=8, topo=topo,
                                       cluster=cluster)
    plain = comm.group_all_to_all_s(message_bytes=token_bytes * 8, topo=topo, cluster=cluster)
    assert got / 4 < one_each < plain  # node limit, then node deduplication, each send fewer bytes across nodes


def test_token_drop_and_a2a_overlap_in_the_estimate(moe_tiny_profile):
    """Oracle: expert_load and data_parallel.overlapped_s. A capacity factor of 1.0 (padded) prices the
    experts and the dispatch at the balanced load whatever the imbalance; the dispatcher's overlap hides it
    behind the block's compute at overlap_slowdown 0 and hides nothing at 1."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=8)
    plan = ap.Plan(dp=8, ep=4, global_batch_size=64)
    skewed = moe_tiny_profile.model_copy(update={"routing_imbalance": 2.0})
    balanced = moe_tiny_profile.model_copy(update={"routing_imbalance": 1.0})
    capped = ap.Stack.preset("torch").model_copy(update={"moe_capacity_factor": 1.0, "moe_pad_to_capacity": True})
    assert (ap.estimate(skewed, cluster, plan, stack=capped).time_breakdown
            == ap.estimate(balanced, cluster, plan).time_breakdown)
    exposed = ap.estimate(balanced, cluster, plan).time_breakdown["ep_comm"]
    overlap = ap.Stack.preset("torch").model_copy(update={"moe_a2a_overlap": True})
    perfect = cluster.model_copy(update={"overlap_slowdown": 0.0})
    none = cluster.model_copy(update={"overlap_slowdown": 1.0})
    assert ap.estimate(balanced, perfect, plan, stack=overlap).time_breakdown["ep_comm"] < exposed
    assert ap.estimate(balanced, none, plan, stack=overlap).time_breakdown["ep_comm"] == pytest.approx(exposed)


def test_fused_moe_kept_bytes_worked_example():
    """deepseek-tiny's MoE layer: h = 64, E = 8 experts, top-2, expert width f = 32 (gate and up: 2 x 32 per
    copy), one shared expert of width 32. bf16 (b = 2):
        2h + 4E = 128 + 32;  per routed copy b·h + 2·(2·32) + b·32 + 2h = 128 + 128 + 64 + 128 = 448, two: 896;
        shared 2·(2·32) + b·32 = 192;  total 1248 B per token.
    float8 inputs (b = 1): copies 2 x (64 + 128 + 32 + 128) = 704, shared 128 + 32 = 160; total 1024 B."""
    profile = ap.profile_model("deepseek-tiny")
    moe = next(layer for layer in profile.layers if layer.kind == "moe")
    assert fused_moe_kept_bytes_per_token(layer=moe, hidden=64, fp8=False) == 1248
    assert fused_moe_kept_bytes_per_token(layer=moe, hidden=64, fp8=True) == 1024


def test_expert_tp_worked_example():
    """2 x (all-gather + reduce-scatter) of M = etp · T·h · k · imbalance on the etp = 2 ranks of a node:
    T·h = 33,554,432 B, k = 2, imbalance 1.25 (ep = 4 > 1) -> M = 2 · 83,886,080 = 167,772,160 B;
    each = 1·1e-6 + 1/2 · 167,772,160 / 1e11 = 8.3987e-4 s; four: 3.3595e-3 s. Without ep the rows a rank
    gathers are exactly its peers' T·k: no imbalance."""
    cluster = _cluster()
    topo = comm.group_topology(group_size=2, stride=1, gpus_per_node=8)
    token_bytes = 4096 * 4096 * 2
    got = expert_tp_s(token_bytes=token_bytes, top_k=2, ep=4, etp=2, imbalance=1.25, topo=topo, cluster=cluster)
    assert got == pytest.approx(4 * (1e-6 + 1 / 2 * 2 * token_bytes * 2 * 1.25 / 1e11))
    alone = expert_tp_s(token_bytes=token_bytes, top_k=2, ep=1, etp=2, imbalance=1.25, topo=topo, cluster=cluster)
    assert alone == pytest.approx(4 * (1e-6 + 1 / 2 * 2 * token_bytes * 2 / 1e11))


def test_expert_tp_limit_case_and_gemm_width():
    """Limit case: etp = 1 moves nothing. Expert GEMMs under etp: etp x the rows at 1/etp of the width, the
    same FLOPs on a rank (the same time at a FLOP-sized efficiency), and etp = 1 is the plain EP cost."""
    cluster = _cluster()
    topo = comm.group_topology(group_size=1, stride=1, gpus_per_node=8)
    assert expert_tp_s(token_bytes=1e9, top_k=2, ep=8, etp=1, imbalance=1.1, topo=topo, cluster=cluster) == 0.0
    gemm = GemmShape(m_per_sequence=256, n=768, k=2048, count=128, tp_split="none")
    kw = dict(gemm=gemm, num_experts=128, ep=8, tokens_split=1, seqs=1, imbalance=1.1, cluster=cluster, grouped=False)
    assert expert_gemm_s(etp=1, **kw) == expert_gemm_s(**kw)
    assert expert_gemm_s(etp=4, **kw) == pytest.approx(expert_gemm_s(**kw))
