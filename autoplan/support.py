"""Which plans the executor runs, decided from the plan and the model's shape alone (no model built, no
torch imported), so `autoplan search --executable` and `autoplan bench` can keep to them, `apply` refuses
the rest in one line before it builds a mesh, and the cost model knows which plans it can hold its memory
model to (costmodel.estimate)."""

from __future__ import annotations

MOE_TP = "tp > 1 on a MoE model is not supported by the executor yet (experts would need their gradients " \
         "reduced over the tp ranks); use ep and dp"
EP_LIMITS = "ep > 1 is supported by the executor with tp=1, cp=1 and zero_stage 0 or 1 so far"

ZERO_BUBBLE_SELECTIVE = "the zero-bubble schedule with selective recompute is not supported: it runs each backward " \
                        "in two passes and torch's selective checkpointing allows one; use full recompute or 1f1b"


OFFLOAD_PARAMS = "offload=params runs on FSDP2's CPUOffloadPolicy over the dp*cp replicas: it needs dp*cp > 1 and " \
                 "ep=1; on one replica use offload=optimizer"

FOREIGN_CP = "cp > 1 needs the reference models' RoPE table; a Hugging Face model computes its rotary tables per " \
             "forward and is not run with context parallelism yet: use cp=1"


def unsupported_reason(plan, *, moe: bool, foreign: bool = False) -> str | None:
    """Why the executor cannot run `plan` on a model (MoE or not; foreign: a Hugging Face model, laid out by
    autoplan.models.hf), or None if it can."""
    if foreign and plan.cp > 1:
        return FOREIGN_CP
    if moe and plan.tp > 1:
        return MOE_TP
    if plan.ep > 1 and plan.cp > 1:
        return f"cp={plan.cp} with ep={plan.ep}: expert parallelism runs with cp=1 only so far"
    if plan.ep > 1 and (plan.tp > 1 or plan.zero_stage > 1):
        return EP_LIMITS
    if plan.offload == "params" and (plan.dp * plan.cp == 1 or plan.ep > 1):
        return OFFLOAD_PARAMS
    if plan.schedule == "zero-bubble" and plan.pp > 1 and \
            any(plan.stage_recompute(stage) == "selective" for stage in range(plan.pp)):
        return ZERO_BUBBLE_SELECTIVE
    return None
