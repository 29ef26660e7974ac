"""Time and memory of one layer for one micro-batch on one rank, under a plan's tp/sp/cp/ep/recompute.

A profile's identical blocks share one LayerProfile template, so the estimate costs each template once
(`ProfileDigest`) and multiplies by how many of its blocks a pipeline stage holds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from autoplan.costmodel import comm
from autoplan.costmodel.compute import (ATTENTION_BWD_FACTOR, CAUSAL_ATTENTION_WORK_FRACTION, GEMM_BWD_FACTOR,
                                        MEMORY_BOUND_BWD_FACTOR, attention_core_time_s, gemm_time_s,
                                        memory_bound_time_s, streaming_time_s)
from autoplan.costmodel.context_parallel import ring_attention_s
from autoplan.costmodel.experts import (dispatch_s, expert_gemm_s, expert_load, expert_tp_s,
                                        fused_moe_kept_bytes_per_token, is_expert_gemm, reachable_nodes)
from autoplan.costmodel.gathers import param_gathers
from autoplan.costmodel.memory import layer_activation_bytes, local_params
from autoplan.schema import Cluster, GemmShape, LayerProfile, ModelProfile, Plan, Stack

# The busiest EP rank sets a MoE layer's pace: its load over the mean is ModelProfile.routing_imbalance, an
# input (default 1.1, the schema says why), capped by the stack's capacity factor where it drops tokens
# (costmodel.experts.expert_load); costmodel.experts applies it to the expert GEMMs and the dispatch.
DEFAULT_STACK = Stack.preset("torch")  # eager PyTorch, what autoplan's executor runs


@dataclass
class LayerCost:
    """Per micro-batch on one rank. Times in seconds, memory in bytes, FLOPs as counted by the trace."""

    fwd_compute_s: float = 0.0
    bwd_compute_s: float = 0.0
    recompute_s: float = 0.0
    tp_comm_s: float = 0.0
    cp_comm_s: float = 0.0
    ep_comm_s: float = 0.0
    activation_bytes: float = 0.0       # kept for backward under the plan's recompute mode
    working_bytes: float = 0.0          # activations of this layer without recompute (alive while it runs)
    dense_params: float = 0.0
    expert_params: float = 0.0
    frozen_params: float = 0.0          # part of dense_params + expert_params that does not train
    recompute_flops_per_sequence: float = 0.0  # extra forward FLOPs of the whole layer, per sequence
    host_wait_s: float = 0.0            # the device idle, waiting for the host to issue the block (profiler.host)
    dense_gathers: float = 0.0          # ZeRO-1's all-gathers of the layer's dense / expert parameters in the
    expert_gathers: float = 0.0         # executor (param_gathers): per step, not per micro-batch

    def add(self, other: LayerCost, times: float = 1.0) -> None:
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + times * getattr(other, name))
        self.working_bytes = max(self.working_bytes, other.working_bytes)

    @property
    def fwd_s(self) -> float:
        return self.fwd_compute_s + (self.tp_comm_s + self.cp_comm_s + self.ep_comm_s) / 2 + self.host_wait_s / 3

    @property
    def bwd_s(self) -> float:  # backward issues about twice forward's ops, and the recomputed ones
        return (self.bwd_compute_s + self.recompute_s + (self.tp_comm_s + self.cp_comm_s + self.ep_comm_s) / 2
                + 2 * self.host_wait_s / 3)


_SUMMED = tuple(f.name for f in fields(LayerCost) if f.name != "working_bytes")


@dataclass(frozen=True)
class ProfileDigest:
    """The profile regrouped: layers before the blocks, one template per distinct block, layers after."""

    head_layers: tuple[LayerProfile, ...]
    block_templates: tuple[tuple[LayerProfile, ...], ...]
    block_template_of: tuple[int, ...]       # block index -> template index
    tail_layers: tuple[LayerProfile, ...]


_DIGESTS: dict[int, tuple[ModelProfile, ProfileDigest]] = {}


def digest(profile: ModelProfile) -> ProfileDigest:
    cached = _DIGESTS.get(id(profile))
    if cached is not None and cached[0] is profile:
        return cached[1]
    head, tail, blocks = [], [], {}
    for layer in profile.layers:
        if layer.block is None:
            (tail if blocks else head).append(layer)
        else:
            blocks.setdefault(layer.block, []).append(layer)
    keys: dict[tuple, int] = {}
    templates, template_of = [], []
    for index in sorted(blocks):
        key = tuple(layer.model_dump_json(exclude={"name", "block"}) for layer in blocks[index])
        if key not in keys:
            keys[key] = len(templates)
            templates.append(tuple(blocks[index]))
        template_of.append(keys[key])
    result = ProfileDigest(tuple(head), tuple(templates), tuple(template_of), tuple(tail))
    if len(_DIGESTS) > 64:
        _DIGESTS.clear()
    _DIGESTS[id(profile)] = (profile, result)
    return result


# A float8 linear casts its bf16 input and weight to float8 before the GEMM (read 2 bytes, write 1, per
# element: 3 bytes), as torchao's Float8Linear does with per-tensor dynamic scaling (plus an amax pass that
# a fused stack folds into the cast).
FP8_CAST_BYTES_PER_ELEMENT = 3.0


def every_other_mm(layer: LayerProfile, mm_offset: int) -> list[tuple[GemmShape, int]]:
    """The layer's GEMMs that torchtitan's op-level selective policy recomputes, as (shape, how many): the
    block's 2nd, 4th, ... matmul in forward order (mm_offset: the block's matmuls before this layer; the
    profile lists a layer's GEMMs in forward order, identical shapes grouped)."""
    recomputed, index = [], mm_offset
    for g in layer.gemms:
        n = sum(1 for c in range(g.count) if (index + c + 1) % 2 == 0)
        index += g.count
        if n:
            recomputed.append((g, n))
    return recomputed


def recomputed_modules(layer: LayerProfile, modules: tuple[str, ...] | list[str], hidden: int
                       ) -> tuple[bool, list[GemmShape]]:
    """What Megatron-LM's selective recompute with `recompute_modules` reruns of `layer`: (the whole layer,
    or the GEMMs it reruns). Megatron-Bridge docs/training/activation-recomputation.md lists the modules:
      mlp:         a dense MLP whole ('no effect on pure-MoE layers'): it keeps only its input
      mla_up_proj: MLA's 'expanded Q/KV projections and RoPE': the GEMMs of an attention layer that read a
                   latent narrower than the hidden size and do not write it (q_b, kv_b; not the output
                   projection), whose outputs (the query, key and value heads, split by tp) are not kept
      core_attn:   the attention core; a fused kernel already recomputes it inside its backward (the
                   seq x seq scores of an eager one are dropped, as Korthikanti et al.'s selective does)
    Ignores RoPE's element-wise work on the recomputed heads."""
    if layer.block is None:
        return False, []
    if "mlp" in modules and layer.kind == "mlp":
        return True, []
    if "mla_up_proj" in modules and layer.kind == "attention":
        return False, [g for g in layer.gemms if g.k < hidden and g.n != hidden]
    return False, []


def micro_batch_boundary_bytes(profile: ModelProfile, plan: Plan) -> float:
    """Bytes of one micro-batch's [b, s, h] activation on one rank (its 1/cp share of the sequence): what
    crosses a block or stage boundary, and what a tensor-parallel collective moves."""
    return profile.hidden * profile.seq_len * profile.dtype_bytes * plan.micro_batch_size / plan.cp


def _gemm_split(g: GemmShape, *, tp: int, layer: LayerProfile) -> int:
    # a MoE layer's GEMMs see 1/tp of the tokens on each tp rank (parallel folding); dense ones split n or k
    return tp if (layer.kind == "moe" or g.tp_split != "none") else 1


def _gemm_s(g: GemmShape, *, seqs: float, tp: int, layer: LayerProfile, cluster: Cluster, clock: float) -> float:
    """Seconds of the g.count GEMMs of shape g on one rank, at the sustained clock."""
    split = _gemm_split(g, tp=tp, layer=layer)
    return g.count * gemm_time_s(flops=2.0 * g.m_per_sequence * g.n * g.k * seqs / split, cluster=cluster) / clock


def layer_cost(*, layer: LayerProfile, profile: ModelProfile, cluster: Cluster, plan: Plan, recompute: str,
               block_first: bool, stack: Stack | None = None, mm_offset: int = 0,
               buckets: tuple[float, float] | None = None) -> LayerCost:
    """Time and memory of `layer` for one micro-batch of plan.micro_batch_size sequences on one rank,
    run by `stack` (None: eager PyTorch, what autoplan's executor runs).

    The stack scales what it changes: the bytes its memory-bound kernels move (fusion), its attention
    kernel's speed, and float8 linears (GEMMs at the cluster's fp8_gemm_speedup plus their casts).
    Tensor-core work (GEMMs, attention) runs at the cluster's sustained_clock_fraction of the
    isolated-kernel rates."""
    stack = stack or DEFAULT_STACK
    tp, cp, ep, mbs = plan.tp, plan.cp, plan.ep, plan.micro_batch_size
    sp = plan.sequence_parallel and tp > 1
    seqs = mbs / cp  # sequences' worth of tokens per rank
    cost = LayerCost()
    # -- compute: GEMMs (TP splits n or k), fused attention core, memory-bound ops
    clock = cluster.sustained_clock_fraction
    # float8 recipes keep the head in bf16, and the experts unless the stack's grouped linears run in float8
    # (Stack.fp8_experts); a router stays in bf16 or fp32 either way
    moe = layer.kind == "moe"
    fp8 = stack.fp8_linears and (layer.kind in ("attention", "mlp") or (moe and stack.fp8_experts))
    gemm_s = row_parallel_s = row_parallel_flops = cast_bytes = 0.0
    load = expert_load(imbalance=profile.routing_imbalance, capacity_factor=stack.moe_capacity_factor,
                       pad_to_capacity=stack.moe_pad_to_capacity) if moe else 1.0
    for g in layer.gemms:
        # experts are not split by tp: each tp rank routes its own 1/tp of the tokens (parallel folding, with
        # SP or without); etp splits their width; the busiest ep rank's experts set the pace
        split = _gemm_split(g, tp=tp, layer=layer)
        if moe and is_expert_gemm(gemm=g, num_experts=layer.num_experts):
            time_s = expert_gemm_s(gemm=g, num_experts=layer.num_experts, ep=ep, tokens_split=split, seqs=seqs,
                                   imbalance=load, grouped=stack.grouped_gemm, cluster=cluster, etp=plan.etp) / clock
            if fp8:  # the rank's expert inputs (all its tokens' rows) and its local experts' weights are cast
                time_s /= cluster.fp8_gemm_speedup
                cast_bytes += FP8_CAST_BYTES_PER_ELEMENT * (load * g.count * g.m_per_sequence * seqs * g.k / split
                                                            + g.count / ep * g.n * g.k / plan.etp)
            gemm_s += time_s
            continue
        time_s = _gemm_s(g, seqs=seqs, tp=tp, layer=layer, cluster=cluster, clock=clock)
        if fp8 and not (moe and g.n == layer.num_experts):  # a MoE layer's router GEMM is not float8
            time_s /= cluster.fp8_gemm_speedup
            cast_bytes += g.count * FP8_CAST_BYTES_PER_ELEMENT * (g.m_per_sequence * seqs * g.k + g.n * g.k) / split
        gemm_s += time_s
        if g.tp_split == "k":
            row_parallel_s += time_s
            row_parallel_flops += g.count * 2.0 * g.m_per_sequence * g.n * g.k  # per sequence, all tp ranks
    causal = CAUSAL_ATTENTION_WORK_FRACTION if profile.attention == "flash" else 1.0
    attn_fwd_s = attention_core_time_s(flops=layer.attention_core_fwd_flops * seqs / tp, causal_fraction=causal,
                                       cluster=cluster) / (clock * stack.attention_speedup)
    # SP shards a block's remaining ops (norms, residuals) by sequence; the head's loss and the embedding stay
    # whole, and so does all of the head's work after its GEMM where the loss reads all-gathered logits
    whole_logits = layer.kind == "head" and not stack.vocab_parallel_loss
    sequence_split = (sp and layer.block is not None) or moe

    def memory_s(total: float, sharded: float | None, streaming: float, extra: float = 0.0) -> float:
        """Seconds of `total` bytes per sequence (`sharded` of them on tensors tp splits, `streaming` moved by
        streaming ops) on this rank, plus `extra` bytes, scaled by the stack's fusion."""
        if sharded is None:  # older profiles: the activations' sharded share
            sharded = layer.activation_tp_sharded_bytes / layer.activation_bytes * total if layer.activation_bytes else 0.0
        fraction = 0.0 if whole_logits or not total else sharded / total
        split = tp if sequence_split else 1 / (fraction / tp + (1 - fraction))
        streaming = min(streaming, total)  # copies, indexing, add/mul: at their own rate
        traffic = stack.memory_bound_traffic
        return (memory_bound_time_s(bytes_moved=((total - streaming) * seqs / split + extra) * traffic, cluster=cluster)
                + streaming_time_s(bytes_moved=streaming * seqs / split * traffic, cluster=cluster))

    mem_fwd_s = memory_s(layer.memory_bound_bytes, layer.memory_bound_tp_sharded_bytes, layer.streaming_bytes,
                         cast_bytes)
    if layer.memory_bound_bwd_bytes is None or stack.memory_bound_traffic < 1.0:
        # a fused kernel's backward reads its saved input and the incoming gradient and writes one gradient:
        # twice its forward's bytes; the eager backward's extra passes (layout copies, concatenated gradients,
        # fp32 round trips) are what fusion removes. Older profiles (no traced backward) so too
        mem_bwd_s = MEMORY_BOUND_BWD_FACTOR * mem_fwd_s
    else:  # eager PyTorch: as traced; a float8 linear's backward casts its gradients too
        mem_bwd_s = memory_s(layer.memory_bound_bwd_bytes, layer.memory_bound_bwd_tp_sharded_bytes,
                             layer.streaming_bwd_bytes or 0.0, MEMORY_BOUND_BWD_FACTOR * cast_bytes)
    if sp and layer.tp_collectives and not moe and stack.sequence_shard_copy:
        # DTensor reduce-scatters along the sequence (dim 1) by copying the tensor's tp chunks into one dim-0
        # tensor first: the whole [b, s, h] read and written once per reduce-scatter, in forward after each
        # row-parallel GEMM and the embedding, in backward for each all-gather's gradient (a block's column-
        # parallel inputs, the head's)
        shuffle_s = streaming_time_s(bytes_moved=2.0 * micro_batch_boundary_bytes(profile, plan) * layer.tp_collectives,
                                     cluster=cluster)
        mem_fwd_s += 0.0 if layer.kind == "head" else shuffle_s
        mem_bwd_s += 0.0 if layer.kind == "embedding" else shuffle_s
    ring = None
    if cp > 1 and layer.kind == "attention":  # torch's ring attention around the kernels (costmodel.context_parallel)
        ring = ring_attention_s(layer=layer, cluster=cluster, plan=plan, seqs=seqs, attn_fwd_s=attn_fwd_s)
        mem_fwd_s, mem_bwd_s = mem_fwd_s + ring[0], mem_bwd_s + ring[1]
    # a fixed cost per layer call on top (dispatch, launches): 0 in presets, fitted on measured machines
    cost.fwd_compute_s = gemm_s + attn_fwd_s + mem_fwd_s + cluster.layer_overhead_fwd_s
    cost.bwd_compute_s = (GEMM_BWD_FACTOR * gemm_s + ATTENTION_BWD_FACTOR * attn_fwd_s
                          + mem_bwd_s + cluster.layer_overhead_bwd_s)
    if layer.block is not None and recompute == "full":
        cost.recompute_s, cost.recompute_flops_per_sequence = cost.fwd_compute_s, layer.fwd_flops
    elif layer.block is not None and recompute == "selective" and stack.selective_recompute == "attention-core":
        # Korthikanti et al. 2022, Sec. 4.3: only the attention core is recomputed (QK^T, softmax, dropout, AV),
        # its score-shaped element-wise ops reading and writing what the profile saw saved; a fused attention
        # kernel already recomputes inside its backward, so nothing more runs
        if layer.attention_score_bytes:
            score_s = memory_bound_time_s(bytes_moved=2 * layer.attention_score_bytes * seqs / tp, cluster=cluster)
            cost.recompute_s = attn_fwd_s + score_s
            cost.recompute_flops_per_sequence = layer.attention_core_fwd_flops
    elif layer.block is not None and recompute == "selective" and stack.selective_recompute == "modules":
        whole, rerun = recomputed_modules(layer, stack.recompute_modules, profile.hidden)
        if whole:
            cost.recompute_s, cost.recompute_flops_per_sequence = cost.fwd_compute_s, layer.fwd_flops
        elif rerun:
            fp8_factor = cluster.fp8_gemm_speedup if fp8 else 1.0
            cost.recompute_s = sum(_gemm_s(g, seqs=seqs, tp=tp, layer=layer, cluster=cluster, clock=clock)
                                   for g in rerun) / fp8_factor
            cost.recompute_flops_per_sequence = sum(g.count * 2.0 * g.m_per_sequence * g.n * g.k for g in rerun)
    elif layer.block is not None and recompute == "selective" and stack.selective_recompute == "every-other-mm":
        # torchtitan's op-level policy: the memory-bound ops and every second matmul of the block run again
        rerun = every_other_mm(layer, mm_offset)
        cost.recompute_s = mem_fwd_s + sum(n / g.count * _gemm_s(g, seqs=seqs, tp=tp, layer=layer,
                                                                  cluster=cluster, clock=clock)
                                           for g, n in rerun) / (cluster.fp8_gemm_speedup if fp8 else 1.0)
        cost.recompute_flops_per_sequence = sum(n * 2.0 * g.m_per_sequence * g.n * g.k for g, n in rerun)
    elif layer.block is not None and recompute == "selective":
        # autoplan.selective: the memory-bound ops run again, and an eager attention's core (its scores);
        # a fused attention's output is kept; under tp the row-parallel GEMMs of the block's first part (the
        # attention's output projection) run again, those of its last part are not needed
        eager, rerun_rows = bool(layer.attention_score_bytes), tp > 1 and block_first
        cost.recompute_s = mem_fwd_s + (attn_fwd_s if eager else 0.0) + (row_parallel_s if rerun_rows else 0.0)
        cost.recompute_flops_per_sequence = ((layer.attention_core_fwd_flops if eager else 0.0)
                                             + (row_parallel_flops if rerun_rows else 0.0))
    # -- communication on the critical path
    boundary_bytes = micro_batch_boundary_bytes(profile, plan)
    tp_topo = comm.group_topology(group_size=tp, stride=1, gpus_per_node=cluster.gpus_per_node)
    if tp > 1 and moe:
        # a MoE layer under tp: with SP its input is the rank's sequence shard already, no collective; without,
        # its input is split locally and its output all-gathered (forward), its input gradient all-gathered
        # (backward) (executor.tensor_parallel.moe_layout)
        cost.tp_comm_s = 0.0 if sp else 2 * comm.group_all_gather_s(message_bytes=boundary_bytes, topo=tp_topo,
                                                                     cluster=cluster)
    elif tp > 1 and layer.tp_collectives:
        # Megatron: one all-reduce forward and one backward per row-parallel GEMM (Shoeybi et al. 2019, Fig. 4);
        # with SP an all-gather + reduce-scatter pair, the same bytes on a ring (Korthikanti et al. 2022, Sec. 4.2.2).
        one = comm.group_all_reduce_s(message_bytes=boundary_bytes, topo=tp_topo, cluster=cluster)
        cost.tp_comm_s = 2 * layer.tp_collectives * one
    if tp > 1 and layer.kind == "head" and not stack.vocab_parallel_loss:
        # the loss needs whole rows of logits: the column-parallel head's output is all-gathered over tp
        # forward ([b, s, V] in the activation dtype); its backward is a local slice, no communication
        logits_bytes = profile.vocab_size * profile.seq_len * profile.dtype_bytes * seqs
        cost.tp_comm_s += 2 * comm.group_all_gather_s(message_bytes=logits_bytes, topo=tp_topo, cluster=cluster)
    if ring is not None:
        cost.cp_comm_s = ring[2]
    if ep > 1 and moe:  # the token dispatcher (costmodel.experts.dispatch_s) on this rank's 1/tp of the tokens
        # (ep ranks etp apart: executor.mesh.build_expert_mesh)
        ep_topo = comm.group_topology(group_size=ep, stride=plan.etp, gpus_per_node=cluster.gpus_per_node)
        reach = reachable_nodes(nodes=ep_topo.nodes, groups=profile.routing_groups,
                                group_top_k=profile.routing_group_top_k)
        cost.ep_comm_s = dispatch_s(token_bytes=boundary_bytes / tp, top_k=layer.top_k, ep=ep, imbalance=load,
                                    dispatcher=stack.moe_dispatcher, topo=ep_topo, cluster=cluster,
                                    reachable_nodes=reach)
    if plan.etp > 1 and moe:  # expert tensor parallelism's gather and reduce-scatter, etp consecutive ranks
        etp_topo = comm.group_topology(group_size=plan.etp, stride=1, gpus_per_node=cluster.gpus_per_node)
        cost.ep_comm_s += expert_tp_s(token_bytes=boundary_bytes / tp, top_k=layer.top_k, ep=ep, etp=plan.etp,
                                      imbalance=load, topo=etp_topo, cluster=cluster)
    # recomputation reruns the forward's collectives too: all of them under full recompute (Megatron-LM's
    # checkpointed forward repeats its all-reduces), SP's all-gathers (one half of each forward pair) under
    # selective recompute (autoplan.selective reruns them rather than keeping their gathered outputs)
    if layer.block is not None and recompute == "full":
        cost.recompute_s += (cost.tp_comm_s + cost.cp_comm_s + cost.ep_comm_s) / 2
    elif layer.block is not None and recompute == "selective" and sp and stack.selective_recompute == "autoplan":
        cost.recompute_s += cost.tp_comm_s / 4
    # -- memory
    cost.activation_bytes = layer_activation_bytes(layer=layer, tp=tp, sequence_parallel=sp, cp=cp,
                                                   recompute=recompute, micro_batch_size=mbs,
                                                   block_first=block_first)
    if moe and stack.fused_moe_activations and not (recompute == "full" and layer.block is not None):
        # a fused MoE path keeps far less than the traced eager module: its own accounting, on the rank's 1/tp of
        # the tokens (parallel folding), at the balanced load
        per_token = fused_moe_kept_bytes_per_token(layer=layer, hidden=profile.hidden, fp8=fp8)
        cost.activation_bytes = per_token * profile.seq_len * seqs / tp
    if layer.block is not None and recompute == "selective" and stack.selective_recompute == "modules":
        cost.activation_bytes = _module_recompute_kept_bytes(layer=layer, profile=profile, stack=stack, tp=tp, sp=sp,
                                                             seqs=seqs, kept=cost.activation_bytes)
    cost.working_bytes = layer_activation_bytes(layer=layer, tp=tp, sequence_parallel=sp, cp=cp, recompute="none",
                                                micro_batch_size=mbs, block_first=block_first)
    cost.dense_gathers, cost.expert_gathers = param_gathers(layer=layer, tp=tp, ep=ep, etp=plan.etp, buckets=buckets)
    cost.dense_params, cost.expert_params = local_params(layer=layer, tp=tp, ep=ep, etp=plan.etp)
    if layer.frozen_params and layer.params:  # frozen tensors split as the layer's others do (a uniform share)
        cost.frozen_params = (cost.dense_params + cost.expert_params) * layer.frozen_params / layer.params
    return cost


def _module_recompute_kept_bytes(*, layer: LayerProfile, profile: ModelProfile, stack: Stack, tp: int, sp: bool,
                                 seqs: float, kept: float) -> float:
    """Bytes `layer` keeps for backward under Megatron-LM's per-module recompute (`recomputed_modules`): a
    whole recomputed layer its input ([b, s, h], /tp with SP); otherwise what Korthikanti et al.'s
    selective keeps (`kept`, scores dropped) less the recomputed GEMMs' outputs (m x n each, split by tp)."""
    whole, rerun = recomputed_modules(layer, stack.recompute_modules, profile.hidden)
    if whole:
        return profile.hidden * profile.seq_len * profile.dtype_bytes * seqs / (tp if sp else 1)
    if "core_attn" not in stack.recompute_modules:  # an eager attention's scores are kept after all
        kept += layer.attention_score_bytes * seqs / tp
    dropped = sum(g.count * g.m_per_sequence * g.n for g in rerun) * profile.dtype_bytes * seqs / tp
    return max(0.0, kept - dropped)
