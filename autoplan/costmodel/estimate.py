"""(ModelProfile, Cluster, Plan) -> Estimate: step time with its breakdown and peak memory per GPU.

Four steps: place the blocks on pipeline chunks; cost each pipeline rank's layers for one micro-batch
(costmodel.layers); run the schedule (costmodel.pipeline) and add the data-parallel synchronisation and
the optimizer step; sum each rank's memory and take the fullest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from autoplan.costmodel import bands, comm
from autoplan.costmodel.comm import overlapped_s
from autoplan.costmodel.data_parallel import dp_sync_s, optimizer_step_s
from autoplan.costmodel.gathers import gather_buckets
from autoplan.costmodel.layers import (DEFAULT_STACK, LayerCost, digest, every_other_mm, layer_cost,
                                       micro_batch_boundary_bytes)
from autoplan.costmodel.memory import PARAM_BYTES, model_state_bytes
from autoplan.costmodel.overhead import overhead_s
from autoplan.costmodel.pipeline import micro_batches_in_flight, pipeline_step_s
from autoplan.costmodel.layer_memory import LayerMemory, backward_excess, backward_steps, forward_excess, layer_memory
from autoplan.costmodel.model_states import RankMemoryInputs, host_bytes, offload_device_states, trainable_fraction
from autoplan.costmodel.rank_memory import rank_peak
from autoplan.schema import Cluster, Estimate, LayerProfile, ModelProfile, Plan, Stack, check_plan
from autoplan.support import profile_reason, unsupported_reason


MEMORY_MODELS = ("executor", "paper")


@dataclass
class RankCost:
    """One pipeline rank: the sum of its layers' costs, and what its memory depends on."""

    layers: LayerCost
    memory: RankMemoryInputs = field(default_factory=RankMemoryInputs)
    logits_bytes: float = 0.0        # the papers' accounting (memory="paper"): the head's activations
    max_layer_params: float = 0.0    # and the largest layer (ZeRO-3's gathered pair)
    blocks: int = 0                  # transformer blocks on the rank (ZeRO-3 gathers and scatters per block)
    working_bytes_but_head: float = 0.0  # the largest layer's working activations, the head left out


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
    (tp, sp, cp, ep, etp, micro-batch, recompute), so they are cached across the plans a search tries."""

    _recent: dict[tuple[int, int, int], Coster] = {}

    def __init__(self, profile: ModelProfile, cluster: Cluster, stack: Stack | None = None):
        self.profile, self.cluster, self.stack = profile, cluster, stack or DEFAULT_STACK
        self.digest = digest(profile)
        self._layers: dict[tuple, tuple[LayerCost, float]] = {}

    @classmethod
    def of(cls, profile: ModelProfile, cluster: Cluster, stack: Stack | None = None) -> Coster:
        stack = stack or DEFAULT_STACK
        key = (id(profile), id(cluster), id(stack))
        coster = cls._recent.get(key)
        if coster is None or coster.profile is not profile or coster.cluster is not cluster or coster.stack is not stack:
            if len(cls._recent) > 16:
                cls._recent.clear()
            coster = cls._recent[key] = cls(profile, cluster, stack)
        return coster

    def layers_cost(self, layers: tuple[LayerProfile, ...], plan: Plan, recompute: str) -> tuple[LayerCost, float]:
        """Summed cost of consecutive layers (a block, or the layers before/after the blocks), and the
        part of their activations that are logits."""
        key = (id(layers), recompute, plan.tp, plan.sequence_parallel, plan.cp, plan.ep, plan.etp,
               plan.micro_batch_size)
        cached = self._layers.get(key)
        if cached is None:
            total, logits, mm_offset = LayerCost(), 0.0, 0
            buckets = self.gather_buckets(plan)
            for i, layer in enumerate(layers):
                one = layer_cost(layer=layer, profile=self.profile, cluster=self.cluster, plan=plan,
                                 recompute=recompute, block_first=i == 0, stack=self.stack, mm_offset=mm_offset,
                                 buckets=buckets)
                mm_offset += sum(g.count for g in layer.gemms)
                total.add(one)
                if layer.kind == "head":
                    logits += one.activation_bytes
            if self.stack.moe_a2a_overlap and total.ep_comm_s:
                # the dispatcher of one micro-batch runs beside the other's attention and expert compute
                # (Megatron-LM's overlap_moe_expert_parallel_comm: forward of one and backward of another
                # interleaved layer by layer): what the block's compute cannot hide is exposed, the rest slows
                # it as any overlapped collective does (data_parallel.overlapped_s). Ignores the pipeline's
                # warm-up and cool-down micro-batches, which have no partner to overlap with.
                total.ep_comm_s = overlapped_s(comm_s=total.ep_comm_s, compute_s=total.fwd_compute_s
                                               + total.bwd_compute_s, cluster=self.cluster)
            # the host issues kernels ahead of the device: a block costs max(device, host) (profiler.host); the
            # host's time is that of autoplan's executor (eager PyTorch), measured, not another stack's
            host_s = self.cluster.host_block_s.get(recompute, 0.0) if self.stack.name == DEFAULT_STACK.name else 0.0
            if host_s and layers and layers[0].block is not None:
                total.host_wait_s = max(0.0, host_s - total.fwd_s - total.bwd_s)
            cached = self._layers[key] = (total, logits)
        return cached

    def gather_buckets(self, plan: Plan) -> tuple[float, float]:
        """Elements per bucket of the rank's ZeRO-1 gathers and reductions by hand (costmodel.layers.gather_buckets),
        from the whole model's tensors."""
        key = ("buckets", plan.tp, plan.ep, plan.etp)
        if key not in self._layers:
            self._layers[key] = gather_buckets(self.profile.layers, tp=plan.tp, ep=plan.ep, etp=plan.etp)
        return self._layers[key]

    def layers_memory(self, layers: tuple[LayerProfile, ...], plan: Plan, recompute: str) -> tuple[LayerMemory, ...]:
        """Memory of each of consecutive layers for one micro-batch (costmodel.layer_memory)."""
        sp = plan.sequence_parallel and plan.tp > 1
        key = ("memory", id(layers), recompute, plan.tp, sp, plan.cp, plan.ep, plan.etp, plan.micro_batch_size)
        cached = self._layers.get(key)
        if cached is None:
            offsets = [sum(g.count for earlier in layers[:i] for g in earlier.gemms) for i in range(len(layers))]
            every_other = self.stack.selective_recompute == "every-other-mm"
            cached = self._layers[key] = tuple(
                layer_memory(layer=layer, tp=plan.tp, sequence_parallel=sp, cp=plan.cp, ep=plan.ep, etp=plan.etp,
                             micro_batch_size=plan.micro_batch_size, recompute=recompute, block_first=i == 0,
                             dtype_bytes=self.profile.dtype_bytes, vocab_parallel_loss=self.stack.vocab_parallel_loss,
                             recomputed_gemms=every_other_mm(layer, offsets[i]) if every_other else ())
                for i, layer in enumerate(layers))
        return cached

    def end_layers(self, plan: Plan, rank: int) -> list[tuple[LayerProfile, ...]]:
        """Layers outside the blocks on pipeline rank `rank`: embedding on the first, head on the last."""
        ends = []
        if rank == 0:
            ends.append(self.digest.head_layers)
        if rank == plan.pp - 1:
            ends.append(self.digest.tail_layers)
        return [layers for layers in ends if layers]

    def rank_cost(self, plan: Plan, rank: int, templates: dict[int, int], recompute: str,
                  last_blocks: tuple[int, ...] | None = None) -> RankCost:
        """One pipeline rank holding `templates` (block template -> count) plus its end layers;
        `last_blocks` are the templates of its last blocks, last first (where its backward starts;
        default: the highest-numbered templates it holds)."""
        if last_blocks is None:
            last_blocks = tuple(t for t in sorted(templates, reverse=True) for _ in range(min(templates[t], 2)))[:2]
        result = RankCost(LayerCost())
        memory = result.memory
        self._pipeline_buffers(memory, plan, rank)
        for template, n in templates.items():
            result.blocks += n
            layers = self.digest.block_templates[template]
            block_cost, _ = self.layers_cost(layers, plan, recompute)
            result.layers.add(block_cost, n)
            result.working_bytes_but_head = max(result.working_bytes_but_head, block_cost.working_bytes)
            unit = block_cost.dense_params + block_cost.expert_params
            result.max_layer_params = max(result.max_layer_params, unit)
            if unit > memory.largest_unit_params:
                memory.largest_unit_params, memory.largest_unit_expert_params = unit, block_cost.expert_params
            memory.experts = max([memory.experts] + [layer.num_experts // plan.ep for layer in layers])
            for one in self.layers_memory(layers, plan, recompute):
                memory.kept += n * one.kept
                memory.kept_none += n * one.kept_none
                memory.weight_grad_inputs += n * one.weight_grad_inputs
                memory.largest_tensor_params = max(memory.largest_tensor_params, one.largest_tensor_params)
        for layers in self.end_layers(plan, rank):
            cost, logits = self.layers_cost(layers, plan, recompute)
            result.layers.add(cost)
            if plan.pp > 1 and layers is self.digest.tail_layers:
                # a weight tied to the first stage's (a head tied to the token table) is a copy of its own on
                # the last stage, with its gradient and optimizer states; vocabulary-parallel under tp
                tied = sum(layer.tied_params for layer in layers) / plan.tp
                result.layers.dense_params += tied
                memory.root_params += tied
            result.logits_bytes += logits
            if not logits:
                result.working_bytes_but_head = max(result.working_bytes_but_head, cost.working_bytes)
            result.max_layer_params = max(result.max_layer_params, cost.dense_params + cost.expert_params)
            memory.root_params += cost.dense_params + cost.expert_params
            memory.embedding_params += sum(layer.params / plan.tp for layer in layers if layer.kind == "embedding")
            tail = layers is self.digest.tail_layers
            for one in self.layers_memory(layers, plan, recompute):
                if tail:
                    memory.kept_head += one.kept + one.output_kept
                    memory.loss_kept += one.loss_kept + one.output_kept
                    memory.logits_kept += one.output_kept
                else:
                    memory.kept += one.kept
                    memory.kept_none += one.kept_none
                memory.weight_grad_inputs += one.weight_grad_inputs
                memory.largest_tensor_params = max(memory.largest_tensor_params, one.largest_tensor_params)
        memory.dense_params, memory.expert_params = result.layers.dense_params, result.layers.expert_params
        memory.frozen_params = result.layers.frozen_params
        self._temporaries(memory, plan, rank, recompute, last_blocks)
        return result

    def _pipeline_buffers(self, memory: RankMemoryInputs, plan: Plan, rank: int) -> None:
        """The [b, s/cp, h] (/tp with SP) activation between stages, and how many of the rank's chunks
        receive activations and gradients (the interleaved layout: chunk c on rank c % pp)."""
        if plan.pp == 1:
            return
        profile, total = self.profile, plan.pp * plan.virtual_stages
        chunks = range(rank, total, plan.pp)
        boundary = micro_batch_boundary_bytes(profile, plan)
        memory.boundary_bytes = boundary / (plan.tp if plan.sequence_parallel and plan.tp > 1 else 1)
        memory.chunks = len(chunks)
        memory.receives_activations = sum(c != 0 for c in chunks)
        memory.receives_gradients = sum(c != total - 1 for c in chunks)

    def _temporaries(self, memory: RankMemoryInputs, plan: Plan, rank: int, recompute: str,
                     last_blocks: tuple[int, ...]) -> None:
        """Temporaries of the rank's forward and of its backward through the head and its last blocks."""
        tail = self.layers_memory(self.digest.tail_layers, plan, recompute) if rank == plan.pp - 1 else ()
        blocks = [self.layers_memory(self.digest.block_templates[t], plan, recompute) for t in last_blocks]
        tail_steps = [(m.kept, m.backward_excess) for m in reversed(tail)]
        memory.head_backward = backward_excess(tail_steps)
        steps = [(kept, 0.0) for kept, _ in tail_steps]
        for block in blocks:
            steps += backward_steps(block, recompute)
        if rank == 0:  # the embedding's backward comes last, after the other blocks' activations are freed
            embedding = self.layers_memory(self.digest.head_layers, plan, recompute)
            rest = memory.kept - sum(kept for kept, _ in steps[len(tail_steps):]) - sum(m.kept for m in embedding)
            steps += [(max(rest, 0.0), 0.0)] + [(m.kept, m.backward_excess) for m in reversed(embedding)]
        memory.block_backward = backward_excess(steps)
        forward = [m for block in reversed(blocks) for m in block] + list(tail)
        memory.forward = forward_excess(forward)
        memory.last_block_kept = sum(m.kept for m in blocks[0]) if blocks else 0.0

    def rank_costs(self, plan: Plan) -> list[RankCost]:
        chunk_blocks = plan.layers_per_stage or even_split(self.profile.num_blocks, plan.pp * plan.virtual_stages)
        templates_per_rank: list[Counter] = [Counter() for _ in range(plan.pp)]
        last_blocks: list[tuple[int, ...]] = [()] * plan.pp
        start = 0
        for chunk, count in enumerate(chunk_blocks):  # chunk c runs on pipeline rank c % pp (interleaved)
            owned = self.digest.block_template_of[start:start + count]
            templates_per_rank[chunk % plan.pp].update(owned)
            if owned:  # the rank's last chunk with blocks is where its backward starts
                last_blocks[chunk % plan.pp] = tuple(reversed(owned[-2:]))
            start += count
        ranks: list[RankCost] = []
        same: dict[tuple, RankCost] = {}  # pipeline ranks with the same layers share one RankCost
        for rank, templates in enumerate(templates_per_rank):
            recompute = plan.stage_recompute(rank)
            end = rank if rank in (0, plan.pp - 1) else -1
            key = (tuple(sorted(templates.items())), recompute, end, last_blocks[rank])
            if key not in same:
                same[key] = self.rank_cost(plan, rank, templates, recompute, last_blocks[rank])
            ranks.append(same[key])
        return ranks

    def p2p_s(self, plan: Plan) -> float:
        """One send of the [b, s/cp, h] boundary activation (/tp with SP) to the next pipeline rank."""
        if plan.pp == 1:
            return 0.0
        profile = self.profile
        boundary_bytes = micro_batch_boundary_bytes(profile, plan)
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

    def estimate(self, plan: Plan, *, check: bool = True, memory: str = "executor") -> Estimate:
        if check:
            check_plan(self.profile, self.cluster, plan)
        if memory not in MEMORY_MODELS:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODELS)}, not {memory!r}")
        ranks = self.rank_costs(plan)
        return _assemble(self.profile, self.cluster, plan, ranks, self.pipeline(plan, ranks), memory, self.stack)


def rank_memory(rank: RankCost, index: int, cluster: Cluster, plan: Plan, memory: str = "executor",
                stack: Stack | None = None) -> dict[str, int]:
    """Peak memory of pipeline rank `index` by category, plus the cluster's reserve: as autoplan's executor
    holds it (costmodel.rank_memory), or (memory="paper") as the papers account for it, with the stack's
    loss kernel."""
    if memory == "paper" or unsupported_reason(plan, moe=rank.memory.experts > 0):
        breakdown = paper_rank_memory(rank, index, plan, stack)
    else:
        breakdown, _ = rank_peak(rank.memory, plan, index)
    breakdown["reserve"] = cluster.memory_reserve_bytes
    return breakdown


def paper_rank_memory(rank: RankCost, index: int, plan: Plan, stack: Stack | None = None) -> dict[str, int]:
    """The papers' accounting, as Megatron-LM runs hold memory: ZeRO's model states (Rajbhandari et al. 2020)
    for the ZeRO stage, Korthikanti et al. 2022's activations (costmodel.memory) times the micro-batches in
    flight, the largest layer's activations as temporaries, ZeRO-3's two gathered layers. What the published
    runs (benchmarks/published_runs.py), made with Megatron-LM, are reproduced with; autoplan's executor holds
    more (costmodel.rank_memory, benchmarks/results/memory_truth.md).

    A stack with a fused loss (Stack.fused_loss: a chunked cross-entropy kernel that writes the logits'
    gradient in place) keeps the 16-bit logits for backward instead of the trace's fp32 copy (half its
    bytes) and has no loss temporaries: the largest other layer's are the rank's."""
    activations, temporaries = rank.layers.activation_bytes, rank.layers.working_bytes
    if stack is not None and stack.fused_loss and rank.logits_bytes:
        activations -= rank.logits_bytes / 2
        temporaries = rank.working_bytes_but_head
    in_flight = micro_batches_in_flight(schedule=plan.schedule, pp=plan.pp, stage=index,
                                        num_micro_batches=plan.num_micro_batches, virtual_stages=plan.virtual_stages)
    dense = model_state_bytes(params=rank.layers.dense_params, zero_stage=plan.zero_stage, shard_degree=plan.dp * plan.cp)
    expert = model_state_bytes(params=rank.layers.expert_params, zero_stage=plan.zero_stage,
                               shard_degree=plan.expert_data_parallel)
    # ZeRO-3 holds two gathered units (the one in use and the one prefetched): a block where a block is one
    # FSDP unit; where parameters are gathered module by module (Stack.zero3_collectives_per_block > 1,
    # DeepSpeed's stage 3), the largest module, whose weight is the rank's largest tensor
    by_module = stack is not None and stack.zero3_collectives_per_block > 1
    unit = min(rank.memory.largest_tensor_params, rank.max_layer_params) if by_module else rank.max_layer_params
    zero3_buffers = 2 * PARAM_BYTES * unit if plan.zero_stage == 3 else 0.0
    train = trainable_fraction(rank.memory)  # frozen parameters: no gradients, no optimizer states
    states = offload_device_states({"params": dense[0] + expert[0], "grads": (dense[1] + expert[1]) * train,
                                    "optimizer": (dense[2] + expert[2]) * train}, plan)
    return {
        **{name: int(value) for name, value in states.items()}, "activations": int(activations * in_flight),
        "temporaries": int(temporaries), "buffers": int(zero3_buffers),
    }


def estimate(profile: ModelProfile, cluster: Cluster, plan: Plan, *, check: bool = True,
             memory: str = "executor", stack: Stack | None = None) -> Estimate:
    """Predict step time, throughput, MFU and per-GPU memory of training `profile` on `cluster` with `plan`.
    memory: "executor" (how autoplan's executor holds memory, held to its dry run) or "paper" (the
    ZeRO and Korthikanti et al. accounting that Megatron-LM runs follow). stack: the software that runs
    the plan (autoplan.schema.Stack; None: eager PyTorch, what autoplan's executor runs)."""
    return Coster.of(profile, cluster, stack).estimate(plan, check=check, memory=memory)


def _assemble(profile: ModelProfile, cluster: Cluster, plan: Plan, ranks: list[RankCost], pipe,
              memory: str = "executor", stack: Stack | None = None) -> Estimate:
    m = plan.num_micro_batches
    distinct = list({id(rank): rank for rank in ranks}.values())
    dp_exposed = max(dp_sync_s(rank, cluster, plan, stack)[0] for rank in distinct)
    optimizer_s = max(optimizer_step_s(rank, cluster, plan, stack) for rank in distinct)
    fixed_s = overhead_s(profile, cluster, plan)
    step_s = pipe.total_s + dp_exposed + optimizer_s + fixed_s

    slowest = max(ranks, key=lambda r: r.layers.fwd_s + r.layers.bwd_s).layers
    time_breakdown = {
        "compute": m * (slowest.fwd_compute_s + slowest.bwd_compute_s), "recompute": m * slowest.recompute_s,
        "tp_comm": m * slowest.tp_comm_s, "cp_comm": m * slowest.cp_comm_s, "ep_comm": m * slowest.ep_comm_s,
        "pp_comm": pipe.p2p_s, "pp_bubble": pipe.bubble_s, "dp_comm_exposed": dp_exposed, "optimizer": optimizer_s,
        "overhead": fixed_s + m * slowest.host_wait_s,
    }
    # a plan the executor refuses has nothing to hold the memory model to: rank_memory accounts for it as the
    # papers do, as the design intends
    refusal = profile_reason(plan, profile) if memory == "executor" else None
    memories = [rank_memory(rank, i, cluster, plan, memory, stack) for i, rank in enumerate(ranks)]
    totals = [sum(mem.values()) for mem in memories]
    peak = max(range(len(totals)), key=totals.__getitem__)
    gpus = plan.gpus
    # the band covers the tensors' bytes; the reserve is a fixed budget, not a prediction
    reserve = cluster.memory_reserve_bytes
    memory_band = tuple(reserve + b for b in bands.memory_band_bytes(totals[peak] - reserve))
    host = int(max(host_bytes(rank.memory, plan) for rank in distinct))
    host_limit = cluster.host_memory_per_gpu_bytes
    fits = totals[peak] <= cluster.memory_bytes and host <= host_limit if host else totals[peak] <= cluster.memory_bytes
    model_flops = profile.train_flops_per_sequence * plan.global_batch_size
    recompute_flops = sum(r.layers.recompute_flops_per_sequence for r in ranks) * plan.global_batch_size
    return Estimate(
        step_time_s=step_s, tokens_per_s=plan.global_batch_size * profile.seq_len / step_s,
        mfu=model_flops / (step_s * gpus * cluster.peak_flops_per_s),
        model_flops_per_gpu_per_s=model_flops / step_s / gpus,
        hardware_flops_per_gpu_per_s=(model_flops + recompute_flops) / step_s / gpus,
        memory_per_gpu_bytes=totals[peak], memory_limit_bytes=cluster.memory_bytes,
        fits=fits, host_memory_per_gpu_bytes=host, host_memory_limit_bytes=host_limit,
        peak_stage=peak, memory_per_stage_bytes=totals,
        step_time_band_s=bands.step_time_band_s(step_s), memory_band_bytes=memory_band,
        memory_at_risk=totals[peak] <= cluster.memory_bytes < memory_band[1],
        time_breakdown=time_breakdown, memory_breakdown=memories[peak],
        notes=_notes(profile, plan) + ([f"{refusal}: memory as the papers account for it"] if refusal else []),
    )


def _notes(profile: ModelProfile, plan: Plan) -> list[str]:
    notes = []
    if profile.attention == "flash":
        notes.append("attention costed as a fused causal kernel (half of its counted FLOPs run)")
    if profile.num_experts:
        notes.append(f"busiest expert takes {profile.routing_imbalance:.2f}x the mean load")
    if plan.sequence_parallel and plan.tp == 1:
        notes.append("sequence_parallel has no effect with tp=1")
    if plan.offload != "none":
        notes.append(f"offload={plan.offload}: the Adam step on the CPU and the host-link copies on the critical "
                     f"path (costmodel.offload)")
    return notes
