"""Peak memory of one pipeline rank as autoplan's executor runs a plan, phase by phase, in the
categories the dry run measures (executor.memtrack): params, grads, optimizer, activations,
temporaries, buffers.

The model the dry run taught (benchmarks/results/memory_truth.md):
1. Model states follow the executor's data-parallel wrapper, not only the ZeRO stage
   (`data_parallel_wrapper`): DDP keeps a second copy of the gradients in its buckets; FSDP without
   resharding (ZeRO-2) keeps its sharded parameter storage beside the gathered
   copy; under a pipeline, torch's schedule keeps FSDP's gathered parameters and unsharded gradients
   for the whole step (it reduces once, after the last micro-batch); with ZeRO-3 and recompute under a
   pipeline, the blocks' parameters stay gathered from their backward to the next forward, so the end of
   a backward holds the stage's parameters whole.
2. Activations follow the executor's kernels (`executor_activation_bytes`): DTensor sequence parallelism
   keeps the all-gathered input of each column-parallel GEMM whole; the executor gathers the logits
   before the loss (no vocabulary-parallel loss), so the head's activations are not split by tp; the
   training loop (or the pipeline schedule) holds the bf16 logits until backward; selective recompute
   keeps the GEMMs', fused attention's and collectives' outputs (autoplan.selective; measured by the
   profiler as selective_bytes) and the block's input;
   expert parallelism keeps the tokens its all-to-all dispatched; under tp a MoE layer keeps 1/tp of its
   activations (each tp rank routes its own sequence shard: executor.tensor_parallel.moe_layout); expert
   tensor parallelism keeps etp x the experts' h-wide rows (the rows gathered over etp).
3. The peak is a moment, not a sum of maxima: it is the largest of the candidates in `rank_peak` —
   backward through the loss and head, backward through the last block, the end of a forward, the
   optimizer step — each with the activations of the micro-batches in flight then
   (pipeline.micro_batches_in_flight) and the temporaries that moment creates (the profiler's
   forward_peak_bytes and backward_peak_bytes per layer, composed in `backward_excess`). Under torch's
   zero-bubble schedule a rank also keeps the micro-batches whose weight-gradient step is still to come.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autoplan.costmodel.memory import GRAD_BYTES, OPTIMIZER_BYTES, PARAM_BYTES
from autoplan.costmodel.offload import host_state_bytes
from autoplan.costmodel.pipeline import micro_batches_at_backward
from autoplan.schema import LayerProfile, Plan

# The optimizer updates in chunks of at most 2**22 elements (executor.precision.CHUNK_ELEMENTS): an fp32
# copy of the gradient chunk, its denominator and one more fp32 chunk are alive at once: 3 x 4 B per element.
OPTIMIZER_CHUNK_ELEMENTS = 2**22
OPTIMIZER_SCRATCH_BYTES_PER_ELEMENT = 3 * 4
# Under expert tensor parallelism a MoE layer's backward holds h-wide gradients of etp x its [T·k, h] rows
# where the single process held one: of the experts' partial output, of their rows, the index backward's zeros
# and of the rows before the gather: 4 (mixtral-8x7b, 2 blocks, full recompute, ep 1-8 x etp 2-4: the dry
# run's temporaries within 10% with 4 where none had been -26%); they do not overlap the stacked weights'
# gradient temporaries (max of the two).
ETP_GRADIENT_COPIES = 4


@dataclass(frozen=True)
class LayerMemory:
    """One layer for one micro-batch on one rank, in bytes."""

    kept: float             # kept from forward to backward under the rank's recompute mode
    kept_none: float        # kept without recompute (what a recomputed block rebuilds in backward)
    forward_excess: float   # temporaries of its forward beyond what it keeps
    backward_excess: float  # temporaries of its backward beyond what it kept (steady state)
    output_kept: float      # the head's logits, held by the training loop / schedule until backward
    loss_kept: float = 0.0  # part of `kept` only the loss needs (the head's fp32 log-probabilities)
    weight_grad_inputs: float = 0.0  # gradients of the outputs whose weight gradients zero-bubble defers
    largest_tensor_params: float = 0.0  # its largest parameter tensor on this rank


def executor_activation_bytes(*, layer: LayerProfile, tp: int, sequence_parallel: bool, cp: int,
                              micro_batch_size: int, recompute: str, block_first: bool,
                              recomputed_gemms: Sequence[tuple] = (), dtype_bytes: int = 2) -> float:
    """Bytes the executor keeps for backward for one micro-batch through `layer` (its kernels; see the
    module docstring, point 2). Korthikanti et al. 2022's accounting is costmodel.memory.layer_activation_bytes;
    this differs where the executor does: sequence parallelism keeps the gathered column-parallel inputs
    (activation_column_input_bytes) whole, the head is not split by tp, selective recompute keeps
    selective_bytes (when the profile has them), full recompute the block's input."""
    scale = micro_batch_size / cp
    if layer.kind == "head":
        return layer.activation_bytes * scale
    if recompute == "full" and layer.block is not None:
        return (layer.output_bytes / (tp if sequence_parallel else 1) if block_first else 0.0) * scale
    if recompute == "selective" and layer.block is not None and layer.selective_bytes:
        # autoplan.selective keeps the GEMMs' and reductions' outputs (under tp a row-parallel GEMM's reduced
        # output, not its partial sum); SP's all-gathers run again in backward; the checkpoint keeps the
        # block's input
        total, sharded, gathered = layer.selective_bytes, layer.selective_tp_sharded_bytes, 0.0
        for g, n in recomputed_gemms:  # a policy that reruns some GEMMs (Stack.selective_recompute) keeps less
            out = n * g.m_per_sequence * g.n * dtype_bytes
            total -= out
            sharded -= out if g.tp_split == "n" else 0.0
        if block_first:
            total += layer.output_bytes
    else:
        total, sharded = layer.activation_bytes, layer.activation_tp_sharded_bytes
        gathered = layer.activation_column_input_bytes if sequence_parallel else 0.0
        if recompute == "selective" and layer.block is not None:
            sharded -= layer.attention_score_bytes
            total -= layer.attention_score_bytes
        if sequence_parallel:  # the gathered copy replaces the sequence shard the column GEMM would save
            total -= layer.activation_column_input_bytes
    if layer.kind == "moe":  # each tp rank routes its own sequence shard (parallel folding), with SP or without
        return total / tp * scale
    replicated = total - sharded
    return (replicated / (tp if sequence_parallel else 1) + sharded / tp + gathered) * scale


def _split(layer: LayerProfile, *, tp: int, sequence_parallel: bool) -> float:
    """How much tp (and SP) shrink this layer's activations: none-mode bytes under tp / bytes per sequence."""
    if layer.kind == "head" or not layer.activation_bytes or tp == 1:
        return 1.0
    none = executor_activation_bytes(layer=layer, tp=tp, sequence_parallel=sequence_parallel, cp=1,
                                     micro_batch_size=1, recompute="none", block_first=False)
    return none / layer.activation_bytes


def layer_memory(*, layer: LayerProfile, tp: int, sequence_parallel: bool, cp: int, micro_batch_size: int,
                 recompute: str, block_first: bool, ep: int = 1, dtype_bytes: int = 2,
                 vocab_parallel_loss: bool = False, recomputed_gemms: Sequence[tuple] = (), etp: int = 1) -> LayerMemory:
    """Memory of `layer` per micro-batch on one rank. Temporaries that grow with the batch scale as the
    layer's activations do; weight-gradient temporaries as its weights (1/tp, experts 1/(ep·etp); a vocabulary-
    parallel embedding's gradient comes back whole). vocab_parallel_loss: the stack computes the loss on the
    vocabulary-parallel logits (Stack.vocab_parallel_loss: torch's loss_parallel, Megatron-LM), so the
    head's logits, their fp32 copies and their temporaries are 1/tp on each rank; autoplan's executor
    gathers them."""
    common = dict(layer=layer, tp=tp, sequence_parallel=sequence_parallel, cp=cp, micro_batch_size=micro_batch_size,
                  block_first=block_first)
    scale = _split(layer, tp=tp, sequence_parallel=sequence_parallel) * micro_batch_size / cp
    weights = 1.0 if layer.kind == "embedding" else 1 / (ep * etp) if layer.kind == "moe" else 1 / tp
    weight_temporaries = layer.backward_peak_weight_bytes * weights
    if layer.kind == "embedding":  # the whole-table gradient comes once, in the parameters' dtype (the traced
        # decomposition accumulates in fp32: twice that, which the dry run of deepseek-v3's first stage did not hold)
        weight_temporaries = min(weight_temporaries, layer.params * dtype_bytes)
    kept = executor_activation_bytes(recompute=recompute, recomputed_gemms=recomputed_gemms, dtype_bytes=dtype_bytes,
                                     **common)
    kept_none = executor_activation_bytes(recompute="none", **common)
    logits_split = tp if layer.kind == "head" and vocab_parallel_loss else 1
    if logits_split > 1:  # the head's input stays whole (or the SP shard gathered), the rest is logits
        kept = (layer.activation_column_input_bytes + (layer.activation_bytes - layer.activation_column_input_bytes)
                / logits_split) * micro_batch_size / cp
        kept_none = kept
        scale /= logits_split
    rows = layer.output_bytes * layer.top_k * micro_batch_size / cp / tp  # the rank's routed rows [T·k, h]
    if layer.kind == "moe" and ep * etp > 1:  # the exchanged rows (dispatched over ep, then gathered over etp:
        # etp x [T·k, h]) stay for backward (and a recomputed forward rebuilds them); selective recompute reruns
        # the exchange (qwen3-30b-a3b, ep 8: the dry run kept 6 GiB less); mixtral-8x7b, 2 blocks, dp 8 with
        # ep 2 etp 2 and ep 1 etp 4: the dry run kept 1 + 2·(etp - 1) x [T·k, h] per layer over ep alone
        dispatched = etp * rows
        kept, kept_none = kept + (dispatched if recompute == "none" else 0.0), kept_none + dispatched
    if layer.kind == "moe" and etp > 1:  # expert tensor parallelism runs the experts on etp x the rows: their
        # h-wide tensors grow by etp (the gathered rows the GEMMs keep without recompute, w2's partial output
        # selective recompute keeps instead), the F-wide ones do not (etp x the rows, 1/etp of the width)
        gathered = (etp - 1) * rows
        kept, kept_none = kept + (gathered if recompute != "full" else 0.0), kept_none + gathered
    head = layer.kind == "head"
    etp_gradients = ETP_GRADIENT_COPIES * (etp - 1) * rows if layer.kind == "moe" else 0.0
    return LayerMemory(
        kept=kept, kept_none=kept_none,
        forward_excess=layer.forward_peak_bytes * scale,
        backward_excess=layer.backward_peak_bytes * scale + max(weight_temporaries, etp_gradients),
        output_kept=layer.output_bytes * micro_batch_size / cp / logits_split if head else 0.0,
        loss_kept=((layer.activation_bytes - layer.activation_column_input_bytes) * micro_batch_size / cp / logits_split
                   if head else 0.0),
        weight_grad_inputs=_weight_gradient_inputs(layer, tp=tp, sequence_parallel=sequence_parallel,
                                                   dtype_bytes=dtype_bytes) * micro_batch_size / cp,
        largest_tensor_params=_largest_tensor(layer, tp=tp, ep=ep * etp))


def _weight_gradient_inputs(layer: LayerProfile, *, tp: int, sequence_parallel: bool, dtype_bytes: int) -> float:
    """Bytes per sequence of the gradients of the layer's weight-GEMM outputs (what a weight-gradient step
    needs besides the saved inputs), plus that of its norm's output: each GEMM's m x n, split by tp when
    column-parallel (and, with SP, when row-parallel: its output is reduce-scattered)."""
    total = 0.0
    for g in layer.gemms:
        split = tp if g.tp_split == "n" or (g.tp_split == "k" and sequence_parallel) else 1
        total += g.count * g.m_per_sequence * g.n * dtype_bytes / split
    if layer.block is not None or layer.kind == "norm":
        total += layer.output_bytes / (tp if sequence_parallel else 1)
    return total


def _largest_tensor(layer: LayerProfile, *, tp: int, ep: int) -> float:
    """Parameters of the layer's largest tensor on one rank: the embedding table or output weight (split by
    tp), a GEMM weight n x k (split when tensor-parallel), a stacked expert weight (a third of the experts'
    parameters, split by ep, or by ep·etp under expert tensor parallelism)."""
    if layer.kind in ("embedding", "head"):
        return layer.params / tp
    largest = max((g.n * g.k / (tp if g.tp_split != "none" else 1) for g in layer.gemms if layer.kind != "moe"),
                  default=0.0)
    return max(largest, layer.expert_params / 3 / ep)


def backward_excess(steps: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(temporaries, kept activations already freed) at the moment of one micro-batch's backward that holds
    the most: `steps` are (kept, temporaries) of each backward step in order; a step's temporaries come on
    top of what the steps before it have freed, so the moment is argmax_i (temporaries_i - sum_{j<i} kept_j)."""
    freed, most = 0.0, (0.0, 0.0)
    for kept, temporaries in steps:
        if temporaries - freed > most[0] - most[1]:
            most = (temporaries, freed)
        freed += kept
    return most


def backward_steps(layers: Sequence[LayerMemory], recompute: str) -> list[tuple[float, float]]:
    """(kept, temporaries) of the backward steps through one block's layers (forward order given); under
    recompute the block first rebuilds the activations it did not keep (full: all; selective: all but the
    GEMMs' outputs it kept), which then count among the temporaries."""
    if recompute not in ("full", "selective"):
        return [(m.kept, m.backward_excess) for m in reversed(layers)]
    kept = sum(m.kept for m in layers)
    rebuilt = sum(m.kept_none for m in layers) - (kept if recompute == "selective" else 0.0)
    temporaries, freed = backward_excess([(m.kept_none, m.backward_excess) for m in reversed(layers)])
    return [(kept, max(rebuilt, 0.0) + temporaries - freed)]


def forward_excess(layers: Sequence[LayerMemory]) -> float:
    """Most bytes above the kept activations during one micro-batch's forward (forward order given):
    a layer's temporaries while the layers after it have kept nothing yet."""
    after, most = 0.0, 0.0
    for m in reversed(layers):
        most = max(most, m.forward_excess - after)
        after += m.kept
    return most


@dataclass
class RankMemoryInputs:
    """What the peak of one pipeline rank depends on, per micro-batch where it says so."""

    dense_params: float = 0.0        # parameters on this rank (after tp); experts apart
    expert_params: float = 0.0       # routed-expert parameters on this rank (after ep)
    frozen_params: float = 0.0       # part of them that does not train (no gradient, no optimizer state)
    embedding_params: float = 0.0    # the vocabulary-parallel table on this rank (its gradient comes back whole)
    largest_unit_params: float = 0.0  # the largest FSDP unit (a block) on this rank
    root_params: float = 0.0         # parameters outside the blocks on this rank (FSDP's root unit)
    kept: float = 0.0                # activations kept per micro-batch by the blocks (and the embedding)
    kept_none: float = 0.0           # the same without recompute
    kept_head: float = 0.0           # kept per micro-batch by the final norm, head and loss, logits included
    loss_kept: float = 0.0           # part of kept_head only the loss needs
    logits_kept: float = 0.0         # part of kept_head that is the head's output (the logits)
    weight_grad_inputs: float = 0.0  # per micro-batch: what zero-bubble's deferred weight-gradient step waits with
    largest_tensor_params: float = 0.0  # its largest parameter tensor (the optimizer step's scratch is bounded by it)
    experts: int = 0                 # rows of the stacked expert weights on this rank (FSDP shards dim 0)
    largest_unit_expert_params: float = 0.0  # the routed-expert part of the largest FSDP unit
    head_backward: tuple[float, float] = (0.0, 0.0)   # (temporaries, kept already freed) at the worst moment of
    block_backward: tuple[float, float] = (0.0, 0.0)  # backward through the loss and head / through the blocks
    forward: float = 0.0             # temporaries of forward beyond what it keeps
    last_block_kept: float = 0.0     # what the rank's last block keeps per micro-batch
    boundary_bytes: float = 0.0      # one micro-batch's activation between pipeline stages
    chunks: int = 1                  # model chunks on this rank (virtual stages)
    receives_activations: int = 0    # chunks that receive their input from another stage
    receives_gradients: int = 0      # chunks that receive their output's gradient from another stage


def data_parallel_wrapper(plan: Plan) -> str:
    """What executor.data_parallel does with the plan over its dp x cp replicas: "none" (one replica, or
    ep or etp > 1 with ZeRO 0/1: gradients averaged by hand; with ZeRO 2/3 experts are FSDP units of their own over
    the expert-data-parallel ranks, `_expert_shard`), "ddp" (composable replicate: ZeRO 0 and 1), "ddp-by-hand" (DDP's
    arithmetic without DDP, gradients all-reduced in place after the step: under a pipeline, or with
    tp > 1), "fsdp-gathered" (FSDP2 without resharding: ZeRO 2), "fsdp" (FSDP2 resharding after forward:
    ZeRO 3). ZeRO 1's optimizer (executor.zero_one) splits its states evenly whatever the wrapper."""
    if plan.dp * plan.cp == 1 or (plan.expert_sharded and plan.zero_stage <= 1):
        return "none"
    if plan.zero_stage <= 1:
        return "ddp" if plan.pp == 1 and plan.tp == 1 else "ddp-by-hand"
    return "fsdp" if plan.zero_stage == 3 else "fsdp-gathered"


def model_states(rank: RankMemoryInputs, plan: Plan) -> dict[str, float]:
    """params, grads (all of them, as after the first backward), optimizer, and the buffers that stay for
    the step: DDP buckets, FSDP's sharded storage beside a gathered copy, pipeline receive buffers."""
    wrapper = data_parallel_wrapper(plan)
    fsdp = wrapper.startswith("fsdp")
    sharded = fsdp_shard_params(rank, plan)
    whole = rank.dense_params + rank.expert_params
    train = trainable_fraction(rank)
    optimizer_shard = optimizer_shard_params(rank, plan)
    grads = GRAD_BYTES * (sharded if fsdp else whole) * train
    if plan.tp > 1 and not fsdp:
        grads += GRAD_BYTES * rank.embedding_params * (plan.tp - 1) * train  # a Replicate DTensor gradient
    buffers = 0.0
    if wrapper == "ddp":
        buffers += GRAD_BYTES * whole * train  # DDP buckets hold the gradients of trainable parameters only
    if wrapper == "fsdp-gathered":
        buffers += PARAM_BYTES * sharded
    micro = plan.num_micro_batches
    buffers += rank.boundary_bytes * micro * (rank.receives_activations + rank.receives_gradients)
    if plan.schedule == "zero-bubble":  # its input-gradient step leaves each micro-batch's gradient on the buffer
        buffers += rank.boundary_bytes * (micro - 1) * rank.receives_activations
    states = {"params": PARAM_BYTES * (sharded if wrapper == "fsdp" else whole), "grads": grads,
              "optimizer": OPTIMIZER_BYTES * optimizer_shard, "buffers": buffers}
    return offload_device_states(states, plan)


def offload_device_states(states: dict[str, float], plan: Plan) -> dict[str, float]:
    """What of the model states stays on the GPU under Plan.offload (costmodel.offload): no optimizer states
    when anything is offloaded; with offload=params neither the sharded parameters nor their gradients."""
    if plan.offload != "none":
        states["optimizer"] = 0.0
    if plan.offload == "params":
        states["params"] = states["grads"] = 0.0
    return states


def trainable_fraction(rank: RankMemoryInputs) -> float:
    """Share of the rank's parameters that train (1 without frozen ones); gradients, optimizer states and
    their traffic scale with it (frozen tensors are assumed spread as the others are)."""
    whole = rank.dense_params + rank.expert_params
    return 1.0 - rank.frozen_params / whole if whole and rank.frozen_params else 1.0


def fsdp_shard_params(rank: RankMemoryInputs, plan: Plan) -> float:
    """Parameters of the rank's FSDP shard (all of them without FSDP)."""
    n_dense = plan.dp * plan.cp if data_parallel_wrapper(plan).startswith("fsdp") else 1
    return rank.dense_params / n_dense + rank.expert_params * _expert_shard(rank, plan)


def optimizer_shard_params(rank: RankMemoryInputs, plan: Plan) -> float:
    """Trainable parameters whose optimizer states the rank keeps: its FSDP shard, ZeRO-1's even chunks, or all."""
    train = trainable_fraction(rank)
    if data_parallel_wrapper(plan).startswith("fsdp"):
        return fsdp_shard_params(rank, plan) * train
    if plan.zero_stage == 1 and plan.dp * plan.cp > 1:  # executor.zero_one: each tensor cut in even chunks over
        #                                                   its replicas (one replica: plain AdamW, experts too)
        return (rank.dense_params / (plan.dp * plan.cp) + rank.expert_params / _edp(plan)) * train
    return (rank.dense_params + rank.expert_params) * train


def host_bytes(rank: RankMemoryInputs, plan: Plan) -> float:
    """Host memory of the rank's offloaded states (costmodel.offload.host_state_bytes) and, at most, the
    scratch of the CPU's optimizer step (a chunk's, as on the GPU without offload)."""
    if plan.offload == "none":
        return 0.0
    scratch = OPTIMIZER_SCRATCH_BYTES_PER_ELEMENT * min(OPTIMIZER_CHUNK_ELEMENTS, rank.largest_tensor_params)
    return scratch + host_state_bytes(optimizer_shard_params=optimizer_shard_params(rank, plan),
                                      sharded_params=fsdp_shard_params(rank, plan), plan=plan)


def _edp(plan: Plan) -> int:
    """Ranks holding the same expert shards: the dp*cp*tp ranks ep and etp fold over divided by ep·etp
    (executor.mesh.build_expert_mesh; at ep=1 under tp too, executor.expert_parallel.folds_experts)."""
    return plan.expert_data_parallel


def _expert_shard(rank: RankMemoryInputs, plan: Plan) -> float:
    """Fraction of the stacked expert weights [E, ...] FSDP leaves on rank 0: it cuts dim 0 in N chunks (N =
    the expert-data-parallel ranks, `_edp`) of ceil(E/N) rows (torch.chunk), so with N > E, or N not dividing
    E, rank 0 holds more than 1/N."""
    if not data_parallel_wrapper(plan).startswith("fsdp"):
        return 1.0
    n = _edp(plan)
    if plan.expert_sharded and rank.experts % n:  # the executor cuts them by their second dim (shard_experts)
        return 1 / n
    return -(-rank.experts // n) / rank.experts if rank.experts else 1 / n


def _expert_padding(rank: RankMemoryInputs, plan: Plan) -> float:
    """The gathered expert weights FSDP holds over their size: N chunks of ceil(E/N) rows, padded."""
    return _expert_shard(rank, plan) * _edp(plan) if rank.experts else 1.0


def rank_peak(rank: RankMemoryInputs, plan: Plan, stage: int, *, physical: bool = False) -> tuple[dict[str, int], str]:
    """The rank's peak memory by category, and the moment it happens at: the largest of backward through
    the loss (ranks with the head), backward through the last block, the end of a forward, the optimizer step.

    Categories are accounted as the ZeRO paper and Korthikanti et al. do: params, grads and optimizer are the
    rank's states; activations the micro-batches in flight times what one keeps; temporaries what the moment
    adds on top, net of the kept activations its backward has freed. The step's gradients exist from its
    second backward on: the first backward (a pipeline's holds the most micro-batches in flight) is costed
    with only the gradients it has made by the moment (through a block: those of the layers after the blocks,
    the head's above all), a later one with all of them. A rank that runs a single backward per step (one
    micro-batch) thus peaks without most of its gradients, as the dry run showed (llama3-8b, dp=8, one
    micro-batch: 15 GiB of gradients the first version counted were not there at the peak); they are all there
    at the optimizer step, which is a candidate.
    physical: split activations and temporaries as the dry run measures them, the activations a backward
    has freed by the moment gone from activations and its temporaries counted whole (same total).
    """
    first, later = micro_batches_at_backward(schedule=plan.schedule, pp=plan.pp, stage=stage,
                                             num_micro_batches=plan.num_micro_batches,
                                             virtual_stages=plan.virtual_stages)
    peaks = [(first, False)] + ([(later, True)] if later is not None else [])
    best = max((_rank_peak(rank, plan, stage, in_flight, grads, physical) for in_flight, grads in peaks),
               key=lambda found: sum(found[0].values()))
    return best


def _activations_held(rank: RankMemoryInputs, plan: Plan, stage: int, in_flight: float) -> tuple[float, int]:
    """(activations the rank holds with `in_flight` micro-batches in flight, micro-batches waiting for their
    zero-bubble weight-gradient step)."""
    # a chunk's input lives in a receive buffer (counted there); a chunk's output stays in the schedule
    # until its backward (the chunks that receive a gradient send an output)
    body = rank.kept + rank.boundary_bytes * (rank.receives_gradients - rank.receives_activations)
    # the last chunk runs each micro-batch's backward right after its forward (GPipe: after all forwards)
    head_in_flight = in_flight if plan.schedule == "gpipe" and plan.pp > 1 else min(in_flight, 1.0)
    # zero-bubble: rank r > 0 runs a micro-batch's weight-gradient step r micro-batches late, keeping its graph
    # (all but what only the loss needs) and the gradients the step needs; rank 0 has no input gradient
    # to split off and runs like 1F1B (torch ScheduleInterleavedZeroBubble, pipeline_order)
    waiting = min(stage, plan.num_micro_batches - 1) if plan.schedule == "zero-bubble" and plan.pp > 1 else 0
    # a waiting micro-batch of a recomputed stage keeps what its input-gradient step rebuilt (all of it), and
    # so does the one whose input-gradient step just ran, until its own weight-gradient step
    rebuilt = rank.kept_none - rank.kept if plan.stage_recompute(stage) != "none" and waiting else 0.0
    held = (in_flight * body + head_in_flight * rank.kept_head + rebuilt
            + waiting * (body + rebuilt + rank.kept_head - rank.loss_kept))
    return held, waiting


def _optimizer_step(rank: RankMemoryInputs, plan: Plan) -> dict[str, float]:
    """The optimizer step: the states, no activations, a chunk's scratch; FSDP2 at stage 2 has resharded."""
    scratch = OPTIMIZER_SCRATCH_BYTES_PER_ELEMENT * min(OPTIMIZER_CHUNK_ELEMENTS, rank.largest_tensor_params)
    step = dict(model_states(rank, plan), activations=0.0,
                temporaries=0.0 if plan.offload != "none" else scratch)  # offloaded: the scratch is on the host
    if data_parallel_wrapper(plan) == "fsdp-gathered":
        step["params"] = 0.0
    return step


def _first_block_end(rank: RankMemoryInputs, plan: Plan, out: dict[str, float], *, made: float, activations: float,
                     physical: bool) -> dict[str, float]:
    """The moment of a micro-batch's backward through the rank's first block in the step's first backward (one
    micro-batch per step: the only one): the gradients of all but that block and the embedding exist; of this
    micro-batch's activations only the block's own remain (the rest freed), its temporaries come whole.
    With full recompute and a single micro-batch this is the peak (mixtral-8x7b, dp 64, ep 4, ZeRO-1, micro-
    batch 8: the dry run's 23.0 of 24.0 GiB of gradients at step 2's backward; the moment at the first block's
    start had counted none)."""
    whole = rank.dense_params + rank.expert_params
    made_params = max(whole - rank.embedding_params - rank.largest_unit_params, 0.0)
    out["grads"] = model_states(rank, plan)["grads"] * made_params / whole if whole else 0.0
    # this micro-batch's activations, gone by its first block: all but that block's, and but the logits, which
    # the training loop holds until its backward returns (under a pipeline the schedule lets them go)
    freed = rank.kept - rank.last_block_kept + rank.kept_head - (rank.logits_kept if plan.pp == 1 else 0.0)
    if physical:
        out["activations"], out["temporaries"] = activations - freed, made
    else:
        out["activations"], out["temporaries"] = activations, made - freed
    return out


def _rank_peak(rank: RankMemoryInputs, plan: Plan, stage: int, in_flight: float, grads: bool,
               physical: bool) -> tuple[dict[str, int], str]:
    """rank_peak for one backward: `in_flight` micro-batches held, the step's gradients there or not."""
    states = model_states(rank, plan)
    # the step's first backward: the gradients of the layers after the blocks exist once it reaches a block
    tail_grads = 0.0
    if not grads:
        whole = rank.dense_params + rank.expert_params
        tail = rank.root_params - rank.embedding_params if rank.head_backward[0] else 0.0
        tail_grads, states["grads"] = (states["grads"] * tail / whole if whole else 0.0), 0.0
    wrapper = data_parallel_wrapper(plan)
    pad = _expert_padding(rank, plan)
    whole_params = PARAM_BYTES * (rank.dense_params + rank.expert_params * pad)
    unit_params = rank.largest_unit_params + rank.largest_unit_expert_params * (pad - 1)
    activations, waiting = _activations_held(rank, plan, stage, in_flight)
    waiting_grads = waiting * rank.weight_grad_inputs

    def moment(temporaries: tuple[float, float], gathered: float, *, forward: bool = False) -> dict[str, float]:
        # the moment's temporaries, net of the kept activations its backward has already freed (the papers'
        # accounting: activations are all the micro-batches in flight keep; the dry run, physically, shows
        # the freed bytes gone from its activations and the temporaries whole)
        made, freed = temporaries
        shift = freed if physical else 0.0
        out = dict(states, activations=activations - shift,
                   temporaries=made - freed + shift + (0.0 if forward else waiting_grads))
        if wrapper == "fsdp-gathered":  # the gathered copy is the params; the all-gather output a buffer
            out["params"] = whole_params
            out["buffers"] += PARAM_BYTES * unit_params if forward and plan.pp == 1 else 0.0
        else:
            out["buffers"] += gathered
        if plan.pp > 1 and wrapper.startswith("fsdp") and grads:  # reduced once, after the last micro-batch
            out["buffers"] += GRAD_BYTES * trainable_fraction(rank) * (
                rank.dense_params + rank.expert_params * pad + rank.embedding_params * (plan.tp - 1))  # (Replicate)
        if plan.pp > 1 and wrapper.startswith("fsdp"):
            out["grads"] = 0.0
        return out

    # FSDP ZeRO-3's gathered copies: none while the loss runs backward (all were resharded after forward),
    # then two blocks (this one and the prefetched next) and the root unit (gathered for its backward)
    # (and, without a pipeline, the unit's unsharded expert gradients, the bulk of a MoE block's, made by its
    # experts' backward and reduce-scattered when the block's backward ends)
    zero3 = wrapper == "fsdp"
    unit_grads = GRAD_BYTES * rank.largest_unit_expert_params * pad if wrapper.startswith("fsdp") and plan.pp == 1 \
        else 0.0
    candidates: dict[str, dict[str, float]] = {}
    if rank.head_backward[0]:
        candidates["backward through the loss"] = moment(rank.head_backward, 0.0)
    made, freed = rank.block_backward
    own = rank.weight_grad_inputs if waiting else 0.0
    block_gathered = unit_grads + (PARAM_BYTES * (2 * unit_params + rank.root_params) if zero3 else 0.0)
    if zero3 and plan.pp == 1 and plan.expert_sharded:
        # experts in FSDP units of their own (expert_parallel.shard_experts): one block's experts gathered, not
        # two, their gradients reduced as they come; the dense parts of two blocks gathered with their unsharded
        # gradients (mixtral-8x7b ZeRO-3, dp 8: ep 8 and ep 1 etp 2 dry runs within 1%; two blocks' experts
        # and their gradients had over-counted them by 43% and 116%)
        dense_unit = rank.largest_unit_params - rank.largest_unit_expert_params
        block_gathered = PARAM_BYTES * (rank.largest_unit_expert_params * pad + rank.root_params) + \
            (PARAM_BYTES + GRAD_BYTES) * 2 * dense_unit
    candidates["backward through a block"] = moment((made + own, freed), block_gathered)
    if not (plan.pp > 1 and wrapper.startswith("fsdp")):
        candidates["backward through a block"]["grads"] += tail_grads
    if not grads and made and not (plan.pp > 1 and wrapper.startswith("fsdp")):  # the first backward's end, through the rank's first block: nearly all gradients made
        candidates["backward through the first block"] = _first_block_end(
            rank, plan, moment((made + own, freed), unit_grads + (PARAM_BYTES * 2 * unit_params if zero3 else 0.0)),
            made=made + own, activations=activations, physical=physical)
    candidates["forward"] = moment((rank.forward, 0.0), PARAM_BYTES * 2 * unit_params if zero3 else 0.0,
                                   forward=True)
    if wrapper.startswith("fsdp") and plan.pp == 1:  # forward gathering the last block, the next prefetched
        gathering = moment((0.0, 0.0), PARAM_BYTES * 2 * unit_params if zero3 else 0.0, forward=True)
        gathering["activations"] -= rank.last_block_kept + rank.kept_head
        gathering["buffers"] += PARAM_BYTES * unit_params if wrapper == "fsdp-gathered" else 0.0
        candidates["forward, gathering a block"] = gathering
    if plan.pp > 1 and zero3 and plan.stage_recompute(stage) != "none":
        # torch's pipeline schedule turns FSDP's reshard-after-backward off for all but the step's last
        # micro-batch: a block's gathered parameters stay until the next forward through it reshards them,
        # so at the end of a recomputed micro-batch's backward the stage's parameters are all gathered (the
        # dry run shows it; without recompute the peak comes earlier in the backward, with fewer gathered)
        ending = moment((made + own, freed), PARAM_BYTES * (rank.dense_params + rank.expert_params * pad))
        ending["activations"] = _activations_held(rank, plan, stage, max(in_flight - 1.0, 0.0))[0]
        candidates["end of a backward, blocks left gathered"] = ending
    candidates["optimizer step"] = _optimizer_step(rank, plan)
    label = max(candidates, key=lambda name: sum(candidates[name].values()))
    when = label if grads or label == "optimizer step" else f"{label} (the step's first)"
    return {name: int(value) for name, value in candidates[label].items()}, when
