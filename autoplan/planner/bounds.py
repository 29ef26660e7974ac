"""Lower bounds the search prunes and orders with (planner.search): on a configuration's step time over every
partition and recompute choice, and on its fullest rank's memory."""

from __future__ import annotations

from autoplan.costmodel.data_parallel import dp_sync_s, optimizer_step_s
from autoplan.costmodel.estimate import Coster, RankCost
from autoplan.costmodel.layers import LayerCost
from autoplan.costmodel.memory import model_state_bytes
from autoplan.costmodel.model_states import RankMemoryInputs, model_states, offload_device_states, trainable_fraction
from autoplan.planner.partition import end_layers_s
from autoplan.schema import Plan


def whole_model(coster: Coster, plan: Plan) -> LayerCost:
    """Cost of all layers for one micro-batch under the plan's tp/cp/ep/micro-batch, nothing recomputed."""
    total = LayerCost()
    dig = coster.digest
    for template in dig.block_template_of:
        total.add(coster.layers_cost(dig.block_templates[template], plan, "none")[0])
    for layers in (dig.head_layers, dig.tail_layers):
        if layers:
            total.add(coster.layers_cost(layers, plan, "none")[0])
    return total


def time_bound_s(coster: Coster, plan: Plan, whole: LayerCost) -> float:
    """A lower bound on the step time of any partition and recompute choice of `plan`'s layout.
    With W = f + b of the whole model per micro-batch and C >= W/p the slowest rank, the pipeline time
    m·C + (Σd_i - d_k)/v of costmodel.pipeline is at least:
      1f1b, gpipe: (m-1)·W/p + W;  interleaved: (m - 1/v)·W/p + W/v;  zero-bubble: (m - 1/v)·W/p + F/v.
    Recompute only adds time. The exposed data-parallel sync and the optimizer step of a rank are convex
    in its share of parameters and compute, so the busiest rank's are at least those of the average rank
    (Jensen), whose backward is credited with a full recompute (the widest overlap window)."""
    m, p = plan.num_micro_batches, plan.pp
    f, w = whole.fwd_s, whole.fwd_s + whole.bwd_s
    v = plan.chunks_per_rank
    slowest = max(w / p, balanced_slowest_s(coster, plan))  # C: no partition has a faster slowest rank
    if p == 1:
        pipe = m * w
    elif plan.schedule in ("1f1b", "gpipe"):
        pipe = (m - 1) * slowest + w
    elif plan.schedule == "interleaved-1f1b":
        pipe = (m - 1 / v) * slowest + w / v
    else:
        pipe = (m - 1 / v) * slowest + f / v
    average = RankCost(LayerCost(fwd_compute_s=whole.fwd_compute_s / p,
                                 bwd_compute_s=(whole.bwd_compute_s + whole.fwd_compute_s) / p,
                                 dense_params=whole.dense_params / p, expert_params=whole.expert_params / p,
                                 frozen_params=whole.frozen_params / p),
                       blocks=coster.profile.num_blocks // p)
    tail = dp_sync_s(average, coster.cluster, plan, coster.stack)[0] + optimizer_step_s(average, coster.cluster, plan, coster.stack)
    return pipe + coster.p2p_total_s(plan) + tail


def balanced_slowest_s(coster: Coster, plan: Plan) -> float:
    """The smallest time of the slowest pipeline rank over all partitions into whole blocks (b each, the
    embedding e_0 on the first rank, the head e_last on the last), nothing recomputed. Feasible for C iff
    floor((C - e_0)/b) + floor((C - e_last)/b) + (p - 2)·floor(C/b) >= L; the least such C is one of the
    values k·b + e. 0 when the blocks are of several kinds (the caller then uses W/p)."""
    dig, p, blocks = coster.digest, plan.pp, coster.profile.num_blocks
    if p == 1 or len(dig.block_templates) != 1:
        return 0.0
    block = coster.layers_cost(dig.block_templates[0], plan, "none")[0]
    b = block.fwd_s + block.bwd_s
    ends = [end_layers_s(coster, plan, rank) for rank in (0, p - 1)]
    if b <= 0:
        return max(ends)

    def holds(c: float) -> int:
        first, last = ((c - e) // b if c >= e else -1 for e in ends)
        return int(first + last + (p - 2) * (c // b)) if min(first, last) >= 0 else -1

    candidates = sorted({k * b + e for k in range(blocks + 1) for e in (0.0, *ends)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # the least candidate C that holds all L blocks
        mid = (lo + hi) // 2
        if holds(candidates[mid] * (1 + 1e-12)) >= blocks:
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def memory_bound_bytes(coster: Coster, plan: Plan, whole: LayerCost) -> float:
    """A lower bound on the fullest rank's memory: the model states spread evenly over the pp ranks
    (the fullest holds at least the mean), plus the reserve."""
    mean = RankMemoryInputs(dense_params=whole.dense_params / plan.pp, expert_params=whole.expert_params / plan.pp,
                            frozen_params=whole.frozen_params / plan.pp)
    train = trainable_fraction(mean)
    dense = model_state_bytes(params=mean.dense_params, zero_stage=plan.zero_stage, shard_degree=plan.dp * plan.cp)
    expert = model_state_bytes(params=mean.expert_params, zero_stage=plan.zero_stage,
                               shard_degree=plan.expert_data_parallel)
    paper = offload_device_states({"params": dense[0] + expert[0], "grads": (dense[1] + expert[1]) * train,
                                   "optimizer": (dense[2] + expert[2]) * train}, plan)
    # the executor's states (costmodel.rank_memory), or the papers' where the estimate falls back to them
    return min(sum(model_states(mean, plan).values()), sum(paper.values())) + coster.cluster.memory_reserve_bytes
