"""Which plans the executor runs, decided from the plan and the model's shape alone (no model built, no
torch imported), so `autoplan search` and `autoplan bench` keep to them, `apply` refuses the rest in one
line before it builds a mesh, and the cost model knows which plans it can hold its memory model to
(costmodel.estimate).

MoE: expert parallelism folds over the dp x cp x tp ranks (executor.mesh.build_expert_mesh) with any ZeRO
stage (ZeRO 2/3 with dp*cp > 1: FSDP2 over the replicas for dense parameters, over the expert-data-parallel
ranks for experts; one replica shards nothing), tensor parallelism splits attention and dense layers while each
tp rank routes its own sequence shard (parallel folding; Hugging Face MoE layers too: autoplan.models.hf), and
context parallelism shards each sequence as for dense models. Experts are not split by tp; expert tensor
parallelism (etp) splits each expert's width over etp ranks of its own, folded with ep over the same dp x cp x tp
ranks (executor.expert_parallel), on autoplan's reference MoE (not yet on Hugging Face stacked experts, whose
fused gate|up weights and biases it does not split).

Hugging Face models (foreign) run every plan a reference model runs but etp; cp > 1 needs the positions the
layout finds in the model, which only the built model tells (FOREIGN_CP, executor.context_parallel)."""

from __future__ import annotations

ZERO_BUBBLE_SELECTIVE = "the zero-bubble schedule with selective recompute is not supported: it runs each backward " \
                        "in two passes and torch's selective checkpointing allows one; use full recompute or 1f1b"

ZERO_BUBBLE_FULL = "the zero-bubble schedule with full recompute is not supported: torch's split backward rebuilds " \
                   "each checkpointed block for its input- and weight-gradient passes and holds the rebuilt " \
                   "activations between them (llama3-8b pp=4: 8.6x the recompute of one forward per micro-batch, " \
                   "middle stages 24-34% over the memory model); use 1f1b or interleaved-1f1b with full recompute"

ZERO_BUBBLE_ZERO3 = "the zero-bubble schedule with ZeRO-3 is not supported: FSDP reshards the parameters between its " \
                    "input- and weight-gradient passes and the losses leave the single-process ones (moe-tiny, pp=2 " \
                    "dp=2: 4e-3 off at step 2); use ZeRO 0-2 or another schedule"

OFFLOAD_PARAMS = "offload=params runs on FSDP2's CPUOffloadPolicy over the dp*cp replicas: it needs dp*cp > 1 and " \
                 "ep=etp=1 (on a MoE model also tp=1); on one replica use offload=optimizer"

FOREIGN_ETP = "etp > 1 on a Hugging Face MoE model is not supported by the executor (its fused gate|up expert weights " \
              "and biases have no expert tensor-parallel layout); use etp=1, or autoplan's reference MoE"

FOREIGN_CP = "cp > 1 needs each rank's positions placed in the model, and autoplan's layout of the Hugging Face " \
             "{model} found neither a rotary embedding (rotary_emb) nor learned positions (wpe) to place them in: " \
             "use cp=1"


def unsupported_reason(plan, *, moe: bool, foreign: bool = False) -> str | None:
    """Why the executor cannot run `plan` on a model (MoE or not; foreign: a Hugging Face model, laid out by
    autoplan.models.hf), or None if it can."""
    if foreign and moe and plan.etp > 1:
        return FOREIGN_ETP
    if plan.ep > 1 and (plan.dp * plan.cp * plan.tp) % plan.ep:
        return f"ep={plan.ep} does not divide dp*cp*tp = {plan.dp * plan.cp * plan.tp}"
    if plan.etp > 1 and not moe:
        return f"etp={plan.etp} splits experts, and the model has none"
    if plan.offload == "params" and (plan.dp * plan.cp == 1 or plan.expert_sharded or (moe and plan.tp > 1)):
        return OFFLOAD_PARAMS
    if plan.schedule == "zero-bubble" and plan.pp > 1 and \
            any(plan.stage_recompute(stage) == "selective" for stage in range(plan.pp)):
        return ZERO_BUBBLE_SELECTIVE
    if plan.schedule == "zero-bubble" and plan.pp > 1 and \
            any(plan.stage_recompute(stage) == "full" for stage in range(plan.pp)):
        return ZERO_BUBBLE_FULL
    if plan.schedule == "zero-bubble" and plan.pp > 1 and plan.zero_stage == 3 and plan.dp * plan.cp > 1:
        return ZERO_BUBBLE_ZERO3
    return None


def profile_reason(plan, profile, *, foreign: bool = False) -> str | None:
    """unsupported_reason for a model known by its ModelProfile."""
    return unsupported_reason(plan, moe=profile.num_experts > 0, foreign=foreign)
