"""One pipeline rank's model states as autoplan's executor holds them (point 1 of costmodel.rank_memory's
docstring): what the rank depends on (RankMemoryInputs), the data-parallel wrapper the executor picks
(`data_parallel_wrapper`), params, grads, optimizer states and the buffers that stay for the step, FSDP's
shards of stacked experts, and what offloading moves to the host."""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.costmodel.memory import GRAD_BYTES, OPTIMIZER_BYTES, PARAM_BYTES
from autoplan.costmodel.offload import host_state_bytes
from autoplan.schema import Plan

# The optimizer updates in chunks of at most 2**22 elements (executor.precision.CHUNK_ELEMENTS): an fp32
# copy of the gradient chunk, its denominator and one more fp32 chunk are alive at once: 3 x 4 B per element.
OPTIMIZER_CHUNK_ELEMENTS = 2**22
OPTIMIZER_SCRATCH_BYTES_PER_ELEMENT = 3 * 4


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


def optimizer_scratch_bytes(rank: RankMemoryInputs) -> float:
    """The optimizer step's scratch: one chunk of the rank's largest tensor (OPTIMIZER_CHUNK_ELEMENTS)."""
    return OPTIMIZER_SCRATCH_BYTES_PER_ELEMENT * min(OPTIMIZER_CHUNK_ELEMENTS, rank.largest_tensor_params)


def trainable_fraction(rank) -> float:
    """Share of the rank's parameters that train (1 without frozen ones); gradients, optimizer states and
    their traffic scale with it (frozen tensors are assumed spread as the others are). `rank`: anything with
    dense_params, expert_params and frozen_params (RankMemoryInputs, costmodel.layers.LayerCost)."""
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
    return optimizer_scratch_bytes(rank) + host_state_bytes(optimizer_shard_params=optimizer_shard_params(rank, plan),
                                      sharded_params=fsdp_shard_params(rank, plan), plan=plan)


def _edp(plan: Plan) -> int:
    """Ranks holding the same expert shards: the dp*cp*tp ranks ep and etp fold over divided by ep·etp
    (executor.mesh.build_expert_mesh; at ep=1 under tp too, executor.expert_parallel.folds_experts)."""
    return plan.expert_data_parallel


def _expert_shard(rank: RankMemoryInputs, plan: Plan) -> float:
    """Fraction of the stacked expert weights [E, ...] FSDP leaves on a rank: 1/N (N = the expert-data-parallel
    ranks, `_edp`), cut by rows where N divides E and by their second dim where it does not
    (executor.data_parallel.even_placement: no padded rows)."""
    return 1 / _edp(plan) if data_parallel_wrapper(plan).startswith("fsdp") else 1.0
