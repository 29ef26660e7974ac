"""(ModelProfile, Cluster, Plan) -> Estimate: step time with its breakdown and peak memory per GPU.

Four steps: place the blocks on pipeline chunks; cost each pipeline rank's layers for one micro-batch
(costmodel.layers); run the schedule (costmodel.pipeline) and add the data-parallel synchronisation and
the optimizer step; sum each rank's memory and take the fullest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from autoplan.costmodel import comm
from autoplan.costmodel.compute import memory_bound_time_s
from autoplan.costmodel.layers import ROUTING_IMBALANCE, LayerCost, ProfileDigest, digest, layer_cost
from autoplan.costmodel.memory import ADAM_STEP_BYTES, GRAD_BYTES, PARAM_BYTES, model_state_bytes
from autoplan.costmodel.pipeline import micro_batches_in_flight, pipeline_step_s
from autoplan.schema import Cluster, Estimate, LayerProfile, ModelProfile, Plan, check_plan


@dataclass
class RankCost:
    """One pipeline rank: the sum of its layers' costs, plus what the head contributes as logits."""

    layers: LayerCost
    logits_bytes: float = 0.0
    max_layer_params: float = 0.0


def even_split(num_blocks: int, chunks: int) -> list[int]:
    """Blocks per pipeline chunk, as even as possible; the remainder goes to the middle chunks, since the
    first chunk also holds the embedding and the most micro-batches in flight and the last the head."""
    base, extra = divmod(num_blocks, chunks)
    middle_first = sorted(range(chunks), key=lambda c: (min(c, chunks - 1 - c) == 0, abs(c - (chunks - 1) / 2)))
    counts = [base] * chunks
    for c in middle_first[:extra]:
        counts[c] += 1
    return counts


class Coster:
    """Costs plans of one (profile, cluster). Layer costs depend on the plan only through
    (tp, sp, cp, ep, micro-batch, recompute), so they are cached across the plans a search tries."""

    _recent: dict[tuple[int, int], Coster] = {}

    def __init__(self, profile: ModelProfile, cluster: Cluster):
        self.profile, self.cluster = profile, cluster
        self.digest = digest(profile)
        self._layers: dict[tuple, tuple[LayerCost, float]] = {}

    @classmethod
    def of(cls, profile: ModelProfile, cluster: Cluster) -> Coster:
        coster = cls._recent.get((id(profile), id(cluster)))
        if coster is None or coster.profile is not profile or coster.cluster is not cluster:
            if len(cls._recent) > 16:
                cls._recent.clear()
            coster = cls._recent[(id(profile), id(cluster))] = cls(profile, cluster)
        return coster

    def layers_cost(self, layers: tuple[LayerProfile, ...], plan: Plan, recompute: str) -> tuple[LayerCost, float]:
        """Summed cost of consecutive layers (a block, or the layers before/after the blocks), and the
        part of their activations that are logits."""
        key = (id(layers), recompute, plan.tp, plan.sequence_parallel, plan.cp, plan.ep, plan.micro_batch_size)
        cached = self._layers.get(key)
        if cached is None:
            total, logits = LayerCost(), 0.0
            for i, layer in enumerate(layers):
                one = layer_cost(layer=layer, profile=self.profile, cluster=self.cluster, plan=plan,
                                 recompute=recompute, block_first=i == 0)
                total.add(one)
                if layer.kind == "head":
                    logits += one.activation_bytes
            cached = self._layers[key] = (total, logits)
        return cached

    def end_layers(self, plan: Plan, rank: int) -> list[tuple[LayerProfile, ...]]:
        """Layers outside the blocks on pipeline rank `rank`: embedding on the first, head on the last."""
        ends = []
        if rank == 0:
            ends.append(self.digest.head_layers)
        if rank == plan.pp - 1:
            ends.append(self.digest.tail_layers)
        return [layers for layers in ends if layers]

    def rank_cost(self, plan: Plan, rank: int, templates: dict[int, int], recompute: str) -> RankCost:
        """One pipeline rank holding `templates` (block template -> count) plus its end layers."""
        result = RankCost(LayerCost())
        for template, n in templates.items():
            block_cost, _ = self.layers_cost(self.digest.block_templates[template], plan, recompute)
            result.layers.add(block_cost, n)
            result.max_layer_params = max(result.max_layer_params, block_cost.dense_params + block_cost.expert_params)
        for layers in self.end_layers(plan, rank):
            cost, logits = self.layers_cost(layers, plan, recompute)
            result.layers.add(cost)
            result.logits_bytes += logits
            result.max_layer_params = max(result.max_layer_params, cost.dense_params + cost.expert_params)
        return result

    def rank_costs(self, plan: Plan) -> list[RankCost]:
        chunk_blocks = plan.layers_per_stage or even_split(self.profile.num_blocks, plan.pp * plan.virtual_stages)
        templates_per_rank: list[Counter] = [Counter() for _ in range(plan.pp)]
        start = 0
        for chunk, count in enumerate(chunk_blocks):  # chunk c runs on pipeline rank c % pp (interleaved)
            templates_per_rank[chunk % plan.pp].update(self.digest.block_template_of[start:start + count])
            start += count
        ranks: list[RankCost] = []
        same: dict[tuple, RankCost] = {}  # pipeline ranks with the same layers share one RankCost
        for rank, templates in enumerate(templates_per_rank):
            recompute = plan.stage_recompute(rank)
            end = rank if rank in (0, plan.pp - 1) else -1
            key = (tuple(sorted(templates.items())), recompute, end)
            if key not in same:
                same[key] = self.rank_cost(plan, rank, templates, recompute)
            ranks.append(same[key])
        return ranks

    def p2p_s(self, plan: Plan) -> float:
        """One send of the [b, s/cp, h] boundary activation (/tp with SP) to the next pipeline rank."""
        if plan.pp == 1:
            return 0.0
        profile = self.profile
        boundary_bytes = profile.hidden * profile.seq_len * profile.dtype_bytes * plan.micro_batch_size / plan.cp
        if plan.sequence_parallel:
            boundary_bytes /= plan.tp
        return comm.p2p_between_stages_s(message_bytes=boundary_bytes, stage_stride_ranks=plan.tp * plan.cp * plan.dp,
                                         cluster=self.cluster)

    def p2p_total_s(self, plan: Plan) -> float:
        """The pipeline's send/recv time on the critical path (as costmodel.pipeline counts it)."""
        return self.pipeline(plan, [RankCost(LayerCost())] * plan.pp).p2p_s

    def pipeline(self, plan: Plan, ranks: list[RankCost]):
        p2p_s = self.p2p_s(plan)
        return pipeline_step_s(schedule=plan.schedule, stage_fwd_s=[r.layers.fwd_s for r in ranks],
                               stage_bwd_s=[r.layers.bwd_s for r in ranks], num_micro_batches=plan.num_micro_batches,
                               virtual_stages=plan.virtual_stages, p2p_s=p2p_s)

    def estimate(self, plan: Plan, *, check: bool = True) -> Estimate:
        if check:
            check_plan(self.profile, self.cluster, plan)
        ranks = self.rank_costs(plan)
        return _assemble(self.profile, self.cluster, plan, ranks, self.pipeline(plan, ranks))


def dp_sync_s(rank: RankCost, cluster: Cluster, plan: Plan) -> tuple[float, float]:
    """(exposed seconds per step, seconds on the link per step) of data-parallel synchronisation.

    ZeRO 0/1: gradient all-reduce; 2: reduce-scatter; both overlap with the last micro-batch's backward
    (PyTorch DDP buckets, Li et al. 2020, Sec. 3.2.3) and ZeRO 1/2 all-gather the updated parameters,
    overlapping the next step's first forward. ZeRO 3 (FSDP, Zhao et al. 2023, Sec. 3.3): every
    micro-batch all-gathers parameters for forward and for backward and reduce-scatters gradients,
    prefetched behind that micro-batch's compute. Dense parameters sync over dp*cp (stride tp); experts
    over the expert-data-parallel ranks dp*cp*tp/ep (stride ep).
    """
    groups = [(rank.layers.dense_params, plan.dp * plan.cp, plan.tp),
              (rank.layers.expert_params, plan.dp * plan.cp * plan.tp // plan.ep, plan.ep)]
    reduce_s = gather_s = 0.0
    for params, size, stride in groups:
        if size <= 1 or params <= 0:
            continue
        topo = comm.group_topology(group_size=size, stride=stride, gpus_per_node=cluster.gpus_per_node)
        grads, weights = GRAD_BYTES * params, PARAM_BYTES * params
        if plan.zero_stage <= 1:
            reduce_s += comm.group_all_reduce_s(message_bytes=grads, topo=topo, cluster=cluster)
        else:
            reduce_s += comm.group_reduce_scatter_s(message_bytes=grads, topo=topo, cluster=cluster)
        if plan.zero_stage >= 1:
            gather_s += comm.group_all_gather_s(message_bytes=weights, topo=topo, cluster=cluster)
    m = plan.num_micro_batches
    fwd_s, bwd_s = rank.layers.fwd_compute_s, rank.layers.bwd_compute_s + rank.layers.recompute_s
    if plan.zero_stage == 3:
        per_micro = 2 * gather_s + reduce_s
        return m * max(0.0, per_micro - (fwd_s + bwd_s)), m * per_micro
    return max(0.0, reduce_s - bwd_s) + max(0.0, gather_s - fwd_s), reduce_s + gather_s


def rank_memory(rank: RankCost, index: int, cluster: Cluster, plan: Plan) -> dict[str, int]:
    in_flight = micro_batches_in_flight(schedule=plan.schedule, pp=plan.pp, stage=index,
                                        num_micro_batches=plan.num_micro_batches,
                                        virtual_stages=plan.virtual_stages)
    dense = model_state_bytes(params=rank.layers.dense_params, zero_stage=plan.zero_stage,
                              shard_degree=plan.dp * plan.cp)
    expert = model_state_bytes(params=rank.layers.expert_params, zero_stage=plan.zero_stage,
                               shard_degree=plan.dp * plan.cp * plan.tp // plan.ep)
    logits = rank.logits_bytes * in_flight
    activations = (rank.layers.activation_bytes - rank.logits_bytes) * in_flight
    # ZeRO-3 holds the unsharded parameters of the layer computing and of the one prefetched.
    zero3_buffers = 2 * PARAM_BYTES * rank.max_layer_params if plan.zero_stage == 3 else 0.0
    return {
        "params": int(dense[0] + expert[0]), "grads": int(dense[1] + expert[1]),
        "optimizer": int(dense[2] + expert[2]), "activations": int(activations), "logits": int(logits),
        # gradients and recomputed activations of the layer in backward live beside the saved ones
        "temporaries": int(rank.layers.working_bytes),
        "buffers": int(zero3_buffers), "reserve": cluster.memory_reserve_bytes,
    }


def estimate(profile: ModelProfile, cluster: Cluster, plan: Plan, *, check: bool = True) -> Estimate:
    """Predict step time, throughput, MFU and per-GPU memory of training `profile` on `cluster` with `plan`."""
    return Coster.of(profile, cluster).estimate(plan, check=check)


def _assemble(profile: ModelProfile, cluster: Cluster, plan: Plan, ranks: list[RankCost], pipe) -> Estimate:
    m = plan.num_micro_batches
    distinct = list({id(rank): rank for rank in ranks}.values())
    dp_exposed = max(dp_sync_s(rank, cluster, plan)[0] for rank in distinct)
    optimizer_s = max(optimizer_step_s(rank, cluster, plan) for rank in distinct)
    step_s = pipe.total_s + dp_exposed + optimizer_s

    slowest = max(ranks, key=lambda r: r.layers.fwd_s + r.layers.bwd_s).layers
    time_breakdown = {
        "compute": m * (slowest.fwd_compute_s + slowest.bwd_compute_s), "recompute": m * slowest.recompute_s,
        "tp_comm": m * slowest.tp_comm_s, "cp_comm": m * slowest.cp_comm_s, "ep_comm": m * slowest.ep_comm_s,
        "pp_comm": pipe.p2p_s, "pp_bubble": pipe.bubble_s, "dp_comm_exposed": dp_exposed, "optimizer": optimizer_s,
    }
    memories = [rank_memory(rank, i, cluster, plan) for i, rank in enumerate(ranks)]
    totals = [sum(mem.values()) for mem in memories]
    peak = max(range(len(totals)), key=totals.__getitem__)
    gpus = plan.gpus
    model_flops = profile.train_flops_per_sequence * plan.global_batch_size
    recompute_flops = sum(r.layers.recompute_flops_per_sequence for r in ranks) * plan.global_batch_size
    return Estimate(
        step_time_s=step_s, tokens_per_s=plan.global_batch_size * profile.seq_len / step_s,
        mfu=model_flops / (step_s * gpus * cluster.peak_flops_per_s),
        model_flops_per_gpu_per_s=model_flops / step_s / gpus,
        hardware_flops_per_gpu_per_s=(model_flops + recompute_flops) / step_s / gpus,
        memory_per_gpu_bytes=totals[peak], memory_limit_bytes=cluster.memory_bytes,
        fits=totals[peak] <= cluster.memory_bytes, peak_stage=peak, memory_per_stage_bytes=totals,
        time_breakdown=time_breakdown, memory_breakdown=memories[peak], notes=_notes(profile, plan),
    )


def optimizer_step_s(rank: RankCost, cluster: Cluster, plan: Plan) -> float:
    """Adam is bandwidth-bound: ADAM_STEP_BYTES per parameter of this rank's optimizer shard."""
    dense = rank.layers.dense_params / (plan.dp * plan.cp if plan.zero_stage >= 1 else 1)
    expert = rank.layers.expert_params / (plan.dp * plan.cp * plan.tp // plan.ep if plan.zero_stage >= 1 else 1)
    return memory_bound_time_s(bytes_moved=(dense + expert) * ADAM_STEP_BYTES, cluster=cluster)


def _notes(profile: ModelProfile, plan: Plan) -> list[str]:
    notes = []
    if profile.attention == "flash":
        notes.append("attention costed as a fused causal kernel (half of its counted FLOPs run)")
    if profile.num_experts:
        notes.append(f"busiest expert takes {ROUTING_IMBALANCE:.2f}x the mean load")
    if plan.sequence_parallel and plan.tp == 1:
        notes.append("sequence_parallel has no effect with tp=1")
    return notes
