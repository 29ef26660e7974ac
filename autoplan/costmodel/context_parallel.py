"""Context parallelism's cost in one attention layer: what torch's ring attention (the executor's, and
torchtitan's: torch.distributed.tensor.experimental context_parallel, all-gather rotation, the default)
runs per micro-batch on one rank beside the attention kernels themselves.

Forward: the rank's keys and values are all-gathered over the cp ranks once (issued before the first,
local, attention call and waited for after it), then cp attention calls on the load-balanced chunks,
each partial output merged into the running one by its log-sum-exp in fp32. Backward: the keys and values
are gathered again, and after each of the cp attention backward calls the fp32 key and value gradients
go to the ranks that own them (an all-to-all of twice the rank's K and V bytes).

The merges, the K/V packing and the gradient accumulation are element-wise ops on query-shaped tensors,
Q = b·(s/cp)·h·2 bytes on the rank (its query, or its output, in the activation dtype). Their bytes, as the
time dry run of the executor counted them on llama3-8b at cp 2 and 4 against cp 1 with as many tokens per
rank (torch 2.13; benchmarks/time_truth.py holds the estimate to that dry run):
    forward   2·Q + 16·(cp-1)·Q     (a clone of the local chunk; per merge: the packed K/V copy 8·Q, the fp32
                                     merge's subtractions 6·Q and product 2·Q)
    backward 34·Q + 28.5·(cp-1)·Q   (zeroed fp32 gradient buffers 9·Q, their accumulation 15·Q + 12.5·Q per
                                     step, the packing of gradients and chunks 8·Q + 16·Q per step, a clone 2·Q)
at the streaming rate (copies, add, mul, sub: costmodel.compute.STREAMING_OPS). Keys and values as wide as
the queries there (the reference models repeat their K/V heads before attention, as transformers does
without enable_gqa); the collectives use the keys and values the model passes (LayerProfile.attention_kv_bytes).
"""

from __future__ import annotations

from autoplan.costmodel import comm
from autoplan.costmodel.compute import ATTENTION_BWD_FACTOR, streaming_time_s
from autoplan.schema import Cluster, LayerProfile, Plan

# query-sized bytes of torch's ring attention per attention call: (fixed, per merge step), in Q
RING_FORWARD_Q = (2.0, 16.0)
RING_BACKWARD_Q = (34.0, 28.5)


def ring_attention_s(*, layer: LayerProfile, cluster: Cluster, plan: Plan, seqs: float,
                     attn_fwd_s: float) -> tuple[float, float, float]:
    """(forward memory-bound seconds, backward memory-bound seconds, communication seconds the step sees) of
    one attention layer for one micro-batch (`seqs` sequences' worth of tokens on the rank) under plan.cp > 1.
    The forward gather overlaps the first (local) attention call, the backward's collectives the attention
    backward calls (comm.overlapped_s: what the compute cannot hide, and κ of what it does)."""
    cp, tp = plan.cp, plan.tp
    q_bytes = layer.output_bytes * seqs / tp
    steps = cp - 1
    fwd_s = streaming_time_s(bytes_moved=(RING_FORWARD_Q[0] + RING_FORWARD_Q[1] * steps) * q_bytes, cluster=cluster)
    bwd_s = streaming_time_s(bytes_moved=(RING_BACKWARD_Q[0] + RING_BACKWARD_Q[1] * steps) * q_bytes, cluster=cluster)
    if layer.attention_kv_bytes:
        kv_bytes = layer.attention_kv_bytes * seqs / tp
    else:  # older profiles: the model's own key/value heads
        kv_bytes = 2 * q_bytes * (layer.num_kv_heads / layer.num_heads if layer.num_heads else 1.0)
    topo = comm.group_topology(group_size=cp, stride=tp, gpus_per_node=cluster.gpus_per_node)
    gather_s = comm.group_all_gather_s(message_bytes=cp * kv_bytes, topo=topo, cluster=cluster)
    gradients_s = cp * comm.group_all_to_all_s(message_bytes=2 * kv_bytes, topo=topo, cluster=cluster)  # fp32
    comm_s = (comm.overlapped_s(comm_s=gather_s, compute_s=attn_fwd_s / cp, cluster=cluster)
              + comm.overlapped_s(comm_s=gather_s + gradients_s, compute_s=ATTENTION_BWD_FACTOR * attn_fwd_s,
                                  cluster=cluster))
    return fwd_s, bwd_s, comm_s
