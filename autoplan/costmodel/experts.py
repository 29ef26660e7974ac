"""The MoE layer's own costs on one rank: its expert GEMMs under expert parallelism (one GEMM per local
expert, or one grouped GEMM for them all) and the token dispatcher's communication (all-to-all or
all-gather), both at a routing imbalance that is an input (ModelProfile.routing_imbalance).

Layout (executor.expert_parallel, Megatron-LM's parallel folding): the ep ranks of a group each route the
tokens of their own sequence shard (tp) and micro-batch; rank r runs experts [r·E/ep, (r+1)·E/ep) on the
tokens every ep rank sends it. With balanced routing an expert sees T·k/E tokens of each of the ep ranks.
Expert tensor parallelism (etp, Megatron-Core's expert_tensor_parallel_size) then gathers those tokens over
etp ranks, each running a 1/etp slice of every local expert's width on all of them, and reduce-scatters the
partial outputs back (`expert_tp_s`).
"""

from __future__ import annotations

from autoplan.costmodel import comm
from autoplan.costmodel.compute import gemm_time_s
from autoplan.schema import Cluster, GemmShape, LayerProfile

DISPATCHERS = ("all-to-all", "all-gather", "node-dedup")


def expert_load(*, imbalance: float, capacity_factor: float | None, pad_to_capacity: bool) -> float:
    """The busiest ep rank's expert tokens over the balanced mean T·k/E.
        dropless (capacity_factor None):  the routing imbalance
        token drop at capacity factor C:  min(imbalance, C)   (an expert drops what exceeds C·T·k/E, so no
                                          rank computes or receives more; Lepikhin et al. 2020, GShard, Sec. 2.2)
        padded to capacity:               C exactly (Megatron-LM's moe_pad_expert_input_to_capacity)
    Ignores a rank whose experts are all below capacity while another's overflow is dropped (the busiest
    rank sets the pace either way)."""
    if capacity_factor is None:
        return imbalance
    return capacity_factor if pad_to_capacity else min(imbalance, capacity_factor)


def reachable_nodes(*, nodes: int, groups: int, group_top_k: int) -> int:
    """Nodes of the ep group one token's experts can lie on. Group-limited routing (DeepSeek-V3, DeepSeek-AI
    2024, Sec. 2.1.2 'node-limited routing'; Megatron-LM's moe_router_num_groups / moe_router_group_topk)
    picks the token's experts from group_top_k of `groups` groups of consecutive experts; ep ranks fill nodes
    in order, so a group lies on max(1, nodes // groups) nodes:
        min(nodes, group_top_k · max(1, nodes // groups));   no limit (group_top_k 0 or 1 group): nodes."""
    if groups <= 1 or group_top_k <= 0:
        return nodes
    return min(nodes, group_top_k * max(1, nodes // groups))


def distinct_destinations(*, top_k: int, choices: float) -> float:
    """Expected distinct destinations (nodes or ranks) among a token's top_k experts when each lands on one of
    `choices` destinations uniformly (as force-balanced or well-balanced routing makes it):
        m · (1 - (1 - 1/m)^k),  m = choices   (occupancy of m bins by k balls; k = 1 -> 1, m = 1 -> 1)."""
    if choices <= 1:
        return 1.0
    return choices * (1 - (1 - 1 / choices) ** top_k)


def node_dedup_all_to_all_s(*, token_bytes: float, top_k: int, imbalance: float, reachable: int,
                            topo: comm.GroupTopology, cluster: Cluster) -> float:
    """One dispatch (or combine) of a node-deduplicating dispatcher (DeepEP, DeepSeek-AI 2024 Sec. 3.2.2:
    'each token is dispatched to a node once over IB, then forwarded over NVLink to its experts' GPUs';
    Megatron-LM's flex dispatcher with the DeepEP or HybridEP backend), on the ep group `topo` of k nodes
    with r ranks each:
        inter-node: token_bytes · D_node · (k-1)/k       D_node = distinct nodes among the top_k experts,
                                                          drawn from `reachable` nodes (group-limited routing)
        intra-node: token_bytes · D_rank · (r-1)/r       D_rank = distinct ranks among them (one copy per
                                                          destination GPU, however many of its experts)
    both times the expert load (imbalance), concurrent (max of the two), plus one α per peer as in
    comm.group_all_to_all_s. One node: the intra-node part alone. Ignores the NVLink hop of tokens that
    arrive by IB at a GPU other than their expert's (DeepEP forwards them; it shares the NVLink budget)."""
    n, r, k = topo.group_size, topo.ranks_per_node, topo.nodes
    if n <= 1:
        return 0.0
    reach = min(reachable, k)
    d_node = distinct_destinations(top_k=top_k, choices=reach)
    d_rank = distinct_destinations(top_k=top_k, choices=reach * r)
    inside_s = token_bytes * imbalance * d_rank * (r - 1) / r / cluster.intra_node.bandwidth_bytes_per_s
    across_s = token_bytes * imbalance * d_node * (k - 1) / k / cluster.inter_node.bandwidth_bytes_per_s
    return (r - 1) * cluster.intra_node.latency_s + (n - r) * cluster.inter_node.latency_s + max(inside_s, across_s)


def is_expert_gemm(*, gemm: GemmShape, num_experts: int) -> bool:
    """A GEMM the profile recorded once per routed expert (count a multiple of E): the experts' weights."""
    return num_experts > 1 and gemm.count >= num_experts and gemm.count % num_experts == 0


def expert_gemm_s(*, gemm: GemmShape, num_experts: int, ep: int, tokens_split: float, seqs: float,
                  imbalance: float, grouped: bool, cluster: Cluster, etp: int = 1) -> float:
    """Time of one expert weight's GEMMs on the busiest rank, per micro-batch:
        local experts  e = count/ep, each on m = m_per_sequence · seqs · ep · etp / tokens_split rows (the ep
        group's tokens, gathered over the etp ranks) and 1/etp of its width (n·k/etp: w1/w3's n, w2's k)
        per-expert GEMMs: e · t(2·m·n·k)       grouped (one kernel, e.g. Megatron's GroupedGEMM): t(e · 2·m·n·k)
    times the imbalance (the busiest rank's tokens over the mean). t is `gemm_time_s`, whose efficiency
    grows with a GEMM's size: many small experts (fine-grained, 128-256 of them) run far below peak one by
    one (Gale et al. 2023, MegaBlocks, Sec. 5) and near a large GEMM's efficiency grouped. Ignores the
    imbalance's own effect on each GEMM's size."""
    local = gemm.count / ep
    flops = 2.0 * gemm.m_per_sequence * seqs * ep * etp / tokens_split * gemm.n * gemm.k / etp
    one_by_one = gemm_time_s(flops=local * flops, cluster=cluster) if grouped else \
        local * gemm_time_s(flops=flops, cluster=cluster)
    return imbalance * one_by_one


def dispatch_s(*, token_bytes: float, top_k: int, ep: int, imbalance: float, dispatcher: str,
               topo: comm.GroupTopology, cluster: Cluster, reachable_nodes: int | None = None) -> float:
    """Communication of the token dispatcher per micro-batch, forward and backward, on the ep group
    (token_bytes: one rank's tokens [T, h] before routing; imbalance: the expert load, `expert_load`).
    all-to-all (GShard, Lepikhin et al. 2020, Sec. 3.2): dispatch and combine forward, both again backward:
        4 · all_to_all(M = token_bytes · k · imbalance)   (the busiest rank receives imbalance x the mean)
    all-gather (Megatron-LM's allgather dispatcher): every rank gathers all ep ranks' tokens and
    reduce-scatters the outputs back; backward the reverse pair:
        2 · (all_gather(ep · token_bytes) + reduce_scatter(ep · token_bytes))   (no imbalance on the link)
    node-dedup: 4 · node_dedup_all_to_all_s (reachable_nodes: the group-limited routing's bound; None: all)
    ep = 1: 0 s."""
    if ep <= 1:
        return 0.0
    if dispatcher == "node-dedup":
        reach = topo.nodes if reachable_nodes is None else reachable_nodes
        return 4 * node_dedup_all_to_all_s(token_bytes=token_bytes, top_k=top_k, imbalance=imbalance,
                                           reachable=reach, topo=topo, cluster=cluster)
    if dispatcher == "all-gather":
        gathered = token_bytes * ep
        return 2 * (comm.group_all_gather_s(message_bytes=gathered, topo=topo, cluster=cluster)
                    + comm.group_reduce_scatter_s(message_bytes=gathered, topo=topo, cluster=cluster))
    if dispatcher != "all-to-all":
        raise ValueError(f"dispatcher must be one of {', '.join(DISPATCHERS)}, not {dispatcher!r}")
    return 4 * comm.group_all_to_all_s(message_bytes=token_bytes * top_k * imbalance, topo=topo, cluster=cluster)


def fused_moe_kept_bytes_per_token(*, layer: LayerProfile, hidden: int, fp8: bool) -> float:
    """Bytes a MoE layer keeps for backward per token of the rank in a fused MoE path (Megatron-Core's
    grouped-GEMM experts with fused permutation and SwiGLU), derived from what each kernel's backward reads:
        2h             the layer's input (router and shared experts read the same normalised tokens)
      + 4E             the router's fp32 probabilities over the E experts
      + k · (b·h       each routed copy's first expert GEMM input (the permuted token)
             + 2·F1    its first GEMMs' outputs (gate and up: the activation's backward reads them)
             + b·f     the activation's output, the second expert GEMM's input
             + 2h)     the expert's output, which the probability-weighted combine's backward reads
      + 2·F1s + b·fs   a shared expert's GEMM outputs and activation (its input is the layer's)
    b = 1 byte where the expert GEMMs run in float8 (TransformerEngine keeps the float8 cast of a GEMM's
    input for its weight gradient), 2 in bf16; F1 = the width of the GEMMs that read h (2f for SwiGLU), f the
    width the second GEMM reads, per expert. Ignores the router's logits and the routing map (E bits)."""
    num_experts, top_k = layer.num_experts, layer.top_k
    b = 1.0 if fp8 else 2.0
    routed = shared = 0.0
    for g in layer.gemms:
        if g.n == num_experts and not is_expert_gemm(gemm=g, num_experts=num_experts):
            continue  # the router
        per_copy = g.count / num_experts if is_expert_gemm(gemm=g, num_experts=num_experts) else g.count
        kept = 2.0 * g.n * per_copy if g.k == hidden else b * g.k * per_copy  # first GEMMs' outputs, second's input
        if is_expert_gemm(gemm=g, num_experts=num_experts):
            routed += kept
        else:
            shared += kept
    return 2.0 * hidden + 4.0 * num_experts + top_k * (b * hidden + routed + 2.0 * hidden) + shared


def expert_tp_s(*, token_bytes: float, top_k: int, ep: int, etp: int, imbalance: float,
                topo: comm.GroupTopology, cluster: Cluster) -> float:
    """Communication of expert tensor parallelism per micro-batch, forward and backward, on the etp group
    (token_bytes: one rank's tokens [T, h] before routing; Megatron-Core's all-to-all dispatcher with
    expert_tensor_parallel_size > 1, as executor.expert_parallel runs it): forward, the rows a rank holds
    after the ep dispatch are all-gathered over etp before the experts and the partial outputs
    reduce-scattered after; backward the reverse pair:
        2 · (all_gather(M) + reduce_scatter(M)),  M = etp · token_bytes · k · imbalance
    (the busiest ep rank's rows, imbalance 1 without ep: each rank gathers exactly its peers' T·k rows).
    etp = 1: 0 s."""
    if etp <= 1:
        return 0.0
    gathered = etp * token_bytes * top_k * (imbalance if ep > 1 else 1.0)
    return 2 * (comm.group_all_gather_s(message_bytes=gathered, topo=topo, cluster=cluster)
                + comm.group_reduce_scatter_s(message_bytes=gathered, topo=topo, cluster=cluster))
