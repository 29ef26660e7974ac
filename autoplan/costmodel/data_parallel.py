"""Data-parallel synchronisation and the optimizer step of one pipeline rank: what they put on the link and
what of it the step sees (costmodel.estimate assembles them with the pipeline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoplan.costmodel import comm
from autoplan.costmodel.comm import overlapped_s
from autoplan.costmodel.compute import optimizer_time_s
from autoplan.costmodel.layers import DEFAULT_STACK
from autoplan.costmodel.memory import GRAD_BYTES, PARAM_BYTES
from autoplan.costmodel.model_states import trainable_fraction
from autoplan.costmodel.offload import fsdp_offload_copies_s, offloaded_step_s
from autoplan.schema import Cluster, Plan, Stack

if TYPE_CHECKING:
    from autoplan.costmodel.estimate import RankCost


def dp_sync_s(rank: RankCost, cluster: Cluster, plan: Plan, stack: Stack | None = None) -> tuple[float, float]:
    """(exposed seconds per step, seconds on the link per step) of data-parallel synchronisation.

    ZeRO 0/1: gradient all-reduce; 2: reduce-scatter (after every micro-batch's backward without a pipeline,
    as FSDP reshards gradients each time; once per step under one); both overlap with backward
    (PyTorch DDP buckets, Li et al. 2020, Sec. 3.2.3) and ZeRO 1/2 all-gather the updated parameters,
    overlapping the next step's first forward. ZeRO 3 (FSDP, Zhao et al. 2023, Sec. 3.3): without a
    pipeline every micro-batch all-gathers each block's parameters for forward and again for backward and
    reduce-scatters its gradients, one collective per block (FSDP's unit; `stack.zero3_collectives_per_block`
    where a stack gathers per module), prefetched behind the compute of the block before: what the
    compute cannot hide is exposed, and so are the first block's gather (nothing runs before it) and
    the last block's reduce-scatter (nothing runs after it). Each collective pays its own latency, which
    at hundreds of ranks is (n-1)·α (comm.group_all_gather_s). Under a pipeline, one gather and one
    reduce-scatter per step. Dense parameters sync over dp*cp
    (stride tp); experts over the expert-data-parallel ranks dp*cp*tp/(ep·etp) (stride ep·etp).
    A stack with dp_sync "autoplan" (the executor's) overlaps ZeRO 0/1's reduction with backward only
    without tp, pp and split experts (else it exposes it, one all-reduce per bucket), and exposes ZeRO-1's all-gathers, one
    per bucket, inside the optimizer step.
    """
    stack = stack or DEFAULT_STACK
    train = trainable_fraction(rank.layers)  # frozen parameters send no gradients (nor, under ZeRO 1/2, updated weights)
    groups = [(rank.layers.dense_params, plan.dp * plan.cp, plan.tp, rank.layers.dense_gathers),
              (rank.layers.expert_params, plan.expert_data_parallel, plan.ep * plan.etp, rank.layers.expert_gathers)]
    units = (max(rank.blocks, 1) * stack.zero3_collectives_per_block + 1) if plan.zero_stage == 3 else 1
    m = plan.num_micro_batches
    # FSDP reshards gradients after every micro-batch's backward (autoplan's executor: no no_sync for
    # ZeRO-2), each reduce-scatter beside that micro-batch's backward; under a pipeline once per step
    reduces = m if plan.zero_stage == 2 and plan.pp == 1 else 1
    reduce_s = gather_s = bucket_gathers_s = bucket_reduces_s = 0.0
    for params, size, stride, collectives in groups:
        if size <= 1 or params <= 0:
            continue
        topo = comm.group_topology(group_size=size, stride=stride, gpus_per_node=cluster.gpus_per_node)
        grads, weights = GRAD_BYTES * params / units, PARAM_BYTES * params / units
        grads *= train
        if plan.zero_stage in (1, 2):
            weights *= train
        if grads <= 0:
            pass
        elif plan.zero_stage <= 1:
            reduce_s += units * comm.group_all_reduce_s(message_bytes=grads, topo=topo, cluster=cluster)
            buckets = max(1.0, collectives)  # by hand: executor.data_parallel.all_reduce_in_buckets, the gathers' rule
            bucket_reduces_s += buckets * comm.group_all_reduce_s(message_bytes=grads / buckets, topo=topo,
                                                                  cluster=cluster)
        else:
            reduce_s += units * reduces * comm.group_reduce_scatter_s(message_bytes=grads, topo=topo, cluster=cluster)
        if plan.zero_stage >= 1 and weights > 0:
            gather_s += units * comm.group_all_gather_s(message_bytes=weights, topo=topo, cluster=cluster)
            buckets = max(1.0, collectives)  # executor.zero_one's (costmodel.gathers.param_gathers)
            bucket_gathers_s += buckets * comm.group_all_gather_s(message_bytes=weights / buckets, topo=topo,
                                                                  cluster=cluster)
    fwd_s, bwd_s = rank.layers.fwd_compute_s, rank.layers.bwd_compute_s + rank.layers.recompute_s
    if plan.offload == "params":  # FSDP2's CPUOffloadPolicy: the shard up before each gather, down after each reduce
        shard = rank.layers.dense_params / (plan.dp * plan.cp) + rank.layers.expert_params / (plan.dp * plan.cp)
        gather_s += fsdp_offload_copies_s(shard_params=shard, gathers=1, reduces=0, cluster=cluster)
        reduce_s += fsdp_offload_copies_s(shard_params=shard, gathers=0, reduces=1, cluster=cluster)
    if plan.zero_stage == 3 and plan.pp > 1:
        # under a pipeline schedule FSDP keeps the gathered parameters for all the step's micro-batches and
        # reduce-scatters the accumulated gradients once (torch.distributed.pipelining with FSDP2, as
        # torchtitan applies it: reshard_after_forward off for pp; autoplan's executor does the same)
        exposed = (overlapped_s(comm_s=gather_s, compute_s=fwd_s, cluster=cluster)
                   + overlapped_s(comm_s=reduce_s, compute_s=bwd_s, cluster=cluster))
        return exposed, gather_s + reduce_s
    if plan.zero_stage == 3:
        per_micro = 2 * gather_s + reduce_s
        edges = (gather_s + reduce_s) / units  # the first gather and the last reduce-scatter
        return m * (overlapped_s(comm_s=per_micro, compute_s=fwd_s + bwd_s, cluster=cluster) + edges), m * per_micro
    if stack.dp_sync == "autoplan" and plan.zero_stage <= 1:
        # autoplan's executor: DDP's buckets reduce beside backward only without tp, pp and split experts; else
        # all-reduces after the last backward, one per bucket of ZERO1_GATHER_BUCKET_ELEMENTS (executor.
        # data_parallel.averages_by_hand, expert_parallel.average_gradients); ZeRO-1 gathers its updated chunks
        # inside the optimizer step, one all-gather per bucket of as many elements (executor.zero_one)
        by_hand = plan.tp > 1 or plan.pp > 1 or (plan.expert_sharded and rank.layers.expert_params > 0)
        if not by_hand:
            reduce_exposed = overlapped_s(comm_s=reduce_s, compute_s=bwd_s, cluster=cluster)
        else:
            reduce_s = reduce_exposed = bucket_reduces_s
        return reduce_exposed + bucket_gathers_s, reduce_s + bucket_gathers_s
    exposed = (overlapped_s(comm_s=reduce_s, compute_s=reduces * bwd_s, cluster=cluster)
               + overlapped_s(comm_s=gather_s, compute_s=fwd_s, cluster=cluster))
    return exposed, reduce_s + gather_s


def optimizer_step_s(rank: RankCost, cluster: Cluster, plan: Plan, stack: Stack | None = None) -> float:
    """Adam is bandwidth-bound: the stack's optimizer bytes per parameter of this rank's optimizer shard
    (Stack.optimizer_step_bytes: ADAM_STEP_BYTES for a fused kernel, more for one pass per element-wise op)."""
    bytes_per_param = (stack or DEFAULT_STACK).optimizer_step_bytes
    dense = rank.layers.dense_params / (plan.dp * plan.cp if plan.zero_stage >= 1 else 1)
    expert = rank.layers.expert_params / (plan.expert_data_parallel if plan.zero_stage >= 1 else 1)
    shard = (dense + expert) * trainable_fraction(rank.layers)  # frozen parameters are not stepped
    if plan.offload != "none":  # on the CPU, with the host-link copies (costmodel.offload)
        return offloaded_step_s(shard_params=shard, plan=plan, cluster=cluster)
    return optimizer_time_s(bytes_moved=shard * bytes_per_param, cluster=cluster)
