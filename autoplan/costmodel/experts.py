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
from autoplan.schema import Cluster, GemmShape

DISPATCHERS = ("all-to-all", "all-gather")


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
               topo: comm.GroupTopology, cluster: Cluster) -> float:
    """Communication of the token dispatcher per micro-batch, forward and backward, on the ep group
    (token_bytes: one rank's tokens [T, h] before routing).
    all-to-all (GShard, Lepikhin et al. 2020, Sec. 3.2): dispatch and combine forward, both again backward:
        4 · all_to_all(M = token_bytes · k · imbalance)   (the busiest rank receives imbalance x the mean)
    all-gather (Megatron-LM's allgather dispatcher): every rank gathers all ep ranks' tokens and
    reduce-scatters the outputs back; backward the reverse pair:
        2 · (all_gather(ep · token_bytes) + reduce_scatter(ep · token_bytes))   (no imbalance on the link)
    ep = 1: 0 s."""
    if ep <= 1:
        return 0.0
    if dispatcher == "all-gather":
        gathered = token_bytes * ep
        return 2 * (comm.group_all_gather_s(message_bytes=gathered, topo=topo, cluster=cluster)
                    + comm.group_reduce_scatter_s(message_bytes=gathered, topo=topo, cluster=cluster))
    if dispatcher != "all-to-all":
        raise ValueError(f"dispatcher must be one of {', '.join(DISPATCHERS)}, not {dispatcher!r}")
    return 4 * comm.group_all_to_all_s(message_bytes=token_bytes * top_k * imbalance, topo=topo, cluster=cluster)


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
