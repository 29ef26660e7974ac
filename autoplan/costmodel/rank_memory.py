"""Peak memory of one pipeline rank as autoplan's executor runs a plan, phase by phase, in the
categories the dry run measures (executor.memtrack): params, grads, optimizer, activations,
temporaries, buffers.

The model the dry run taught (benchmarks/results/memory_truth.md):
1. Model states follow the executor's data-parallel wrapper, not only the ZeRO stage
   (`model_states.data_parallel_wrapper`): DDP keeps a second copy of the gradients in its buckets; FSDP without
   resharding (ZeRO-2) keeps its sharded parameter storage beside the gathered
   copy; under a pipeline, torch's schedule keeps FSDP's gathered parameters and unsharded gradients
   for the whole step (it reduces once, after the last micro-batch); with ZeRO-3 and recompute under a
   pipeline, the blocks' parameters stay gathered from their backward to the next forward, so the end of
   a backward holds the stage's parameters whole.
2. Activations follow the executor's kernels (`layer_memory.executor_activation_bytes`): DTensor sequence
   parallelism keeps the all-gathered input of each column-parallel GEMM whole; the executor gathers the logits
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
   forward_peak_bytes and backward_peak_bytes per layer, composed in `layer_memory.backward_excess`). Under
   torch's zero-bubble schedule a rank also keeps the micro-batches whose weight-gradient step is still to come.
"""

from __future__ import annotations

from autoplan.costmodel.memory import GRAD_BYTES, PARAM_BYTES
from autoplan.costmodel.model_states import (RankMemoryInputs, data_parallel_wrapper, model_states,
                                             optimizer_scratch_bytes, trainable_fraction)
from autoplan.costmodel.pipeline import micro_batches_at_backward
from autoplan.schema import Plan


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
    states = model_states(rank, plan)
    best = max((_rank_peak(rank, plan, stage, in_flight, grads, physical, states) for in_flight, grads in peaks),
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


def _optimizer_step(rank: RankMemoryInputs, plan: Plan, states: dict[str, float]) -> dict[str, float]:
    """The optimizer step: the states, no activations, a chunk's scratch; FSDP2 at stage 2 has resharded."""
    step = dict(states, activations=0.0,  # offloaded: the scratch is on the host
                temporaries=0.0 if plan.offload != "none" else optimizer_scratch_bytes(rank))  # offloaded: the scratch is on the host
    if data_parallel_wrapper(plan) == "fsdp-gathered":
        step["params"] = 0.0
    return step


def _first_block_end(rank: RankMemoryInputs, plan: Plan, out: dict[str, float], *, made: float, activations: float,
                     physical: bool, all_grads: float) -> dict[str, float]:
    """The moment of a micro-batch's backward through the rank's first block in the step's first backward (one
    micro-batch per step: the only one): the gradients of all but that block and the embedding exist; of this
    micro-batch's activations only the block's own remain (the rest freed), its temporaries come whole.
    With full recompute and a single micro-batch this is the peak (mixtral-8x7b, dp 64, ep 4, ZeRO-1, micro-
    batch 8: the dry run's 23.0 of 24.0 GiB of gradients at step 2's backward; the moment at the first block's
    start had counted none)."""
    whole = rank.dense_params + rank.expert_params
    made_params = max(whole - rank.embedding_params - rank.largest_unit_params, 0.0)
    out["grads"] = all_grads * made_params / whole if whole else 0.0
    # this micro-batch's activations, gone by its first block: all but that block's, and but the logits, which
    # the training loop holds until its backward returns (under a pipeline the schedule lets them go)
    freed = rank.kept - rank.last_block_kept + rank.kept_head - (rank.logits_kept if plan.pp == 1 else 0.0)
    if physical:
        out["activations"], out["temporaries"] = activations - freed, made
    else:
        out["activations"], out["temporaries"] = activations, made - freed
    return out


def _rank_peak(rank: RankMemoryInputs, plan: Plan, stage: int, in_flight: float, grads: bool,
               physical: bool, all_states: dict[str, float]) -> tuple[dict[str, int], str]:
    """rank_peak for one backward: `in_flight` micro-batches held, the step's gradients there or not
    (`all_states`: costmodel.model_states of the rank, left unchanged)."""
    states = dict(all_states)
    # the step's first backward: the gradients of the layers after the blocks exist once it reaches a block
    tail_grads = 0.0
    if not grads:
        whole = rank.dense_params + rank.expert_params
        tail = rank.root_params - rank.embedding_params if rank.head_backward[0] else 0.0
        tail_grads, states["grads"] = (states["grads"] * tail / whole if whole else 0.0), 0.0
    wrapper = data_parallel_wrapper(plan)
    whole_params = PARAM_BYTES * (rank.dense_params + rank.expert_params)
    unit_params = rank.largest_unit_params
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
                rank.dense_params + rank.expert_params + rank.embedding_params * (plan.tp - 1))  # (Replicate)
        if plan.pp > 1 and wrapper.startswith("fsdp"):
            out["grads"] = 0.0
        return out

    # FSDP ZeRO-3's gathered copies: none while the loss runs backward (all were resharded after forward),
    # then two blocks (this one and the prefetched next) and the root unit (gathered for its backward)
    # (and, without a pipeline, the unit's unsharded expert gradients, the bulk of a MoE block's, made by its
    # experts' backward and reduce-scattered when the block's backward ends)
    zero3 = wrapper == "fsdp"
    unit_grads = GRAD_BYTES * rank.largest_unit_expert_params if wrapper.startswith("fsdp") and plan.pp == 1 \
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
        block_gathered = PARAM_BYTES * (rank.largest_unit_expert_params + rank.root_params) + \
            (PARAM_BYTES + GRAD_BYTES) * 2 * dense_unit
    candidates["backward through a block"] = moment((made + own, freed), block_gathered)
    if not (plan.pp > 1 and wrapper.startswith("fsdp")):
        candidates["backward through a block"]["grads"] += tail_grads
    if not grads and made and not (plan.pp > 1 and wrapper.startswith("fsdp")):  # the first backward's end, through the rank's first block: nearly all gradients made
        candidates["backward through the first block"] = _first_block_end(
            rank, plan, moment((made + own, freed), unit_grads + (PARAM_BYTES * 2 * unit_params if zero3 else 0.0)),
            made=made + own, activations=activations, physical=physical, all_grads=all_states["grads"])
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
        ending = moment((made + own, freed), PARAM_BYTES * (rank.dense_params + rank.expert_params))
        ending["activations"] = _activations_held(rank, plan, stage, max(in_flight - 1.0, 0.0))[0]
        candidates["end of a backward, blocks left gathered"] = ending
    candidates["optimizer step"] = _optimizer_step(rank, plan, all_states)
    label = max(candidates, key=lambda name: sum(candidates[name].values()))
    when = label if grads or label == "optimizer step" else f"{label} (the step's first)"
    return {name: int(value) for name, value in candidates[label].items()}, when
