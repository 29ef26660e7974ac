"""Fixed costs of running a plan that scale with calls, not with bytes or FLOPs: the training loop per step
and per micro-batch, DTensor dispatch per tensor-parallel layer call, FSDP's per-unit gather/scatter calls,
DDP's per-step synchronisation, the ring attention's per-call set-up, the pipeline's per-micro-batch
send/recv and schedule bookkeeping, the all-to-all set-up of expert parallelism.

On large GPU jobs these hide behind kernels measured in milliseconds (the presets set none); on small
models and on CPUs they dominate. Their coefficients (seconds per call) are fitted from measured runs
(`autoplan calibrate` over `autoplan bench` results) and stored in `Cluster.overheads`; the cost model
adds sum(coefficient x count) to the step. The counts are per step on one rank, a pipeline rank holding
1/pp of the layers.
"""

from __future__ import annotations

from autoplan.costmodel.model_states import data_parallel_wrapper
from autoplan.schema import Cluster, ModelProfile, Plan

FEATURES = ("per_step", "per_micro_batch", "tp_per_layer_call", "cp_per_attention_call", "fsdp_per_unit_call",
            "ddp_per_step", "pp_per_micro_batch", "ep_per_moe_call")


def uses_fsdp(plan: Plan) -> bool:
    """The executor's ZeRO mapping (executor.data_parallel): FSDP2 for stages 2-3."""
    return data_parallel_wrapper(plan).startswith("fsdp")


def call_counts(profile: ModelProfile, plan: Plan) -> dict[str, float]:
    """How many times per step one rank pays each fixed cost of FEATURES."""
    m, pp = plan.num_micro_batches, plan.pp
    layers = len(profile.layers) / pp
    attention = sum(layer.kind == "attention" for layer in profile.layers) / pp
    moe = sum(layer.kind == "moe" for layer in profile.layers) / pp
    fsdp = uses_fsdp(plan)
    return {
        "per_step": 1.0,
        "per_micro_batch": float(m),
        "tp_per_layer_call": m * layers if plan.tp > 1 else 0.0,
        "cp_per_attention_call": m * attention if plan.cp > 1 else 0.0,
        "fsdp_per_unit_call": m * (profile.num_blocks / pp + 1) if fsdp else 0.0,
        "ddp_per_step": 1.0 if plan.dp * plan.cp > 1 and not fsdp and not plan.expert_sharded else 0.0,
        "pp_per_micro_batch": m * plan.virtual_stages if pp > 1 else 0.0,
        "ep_per_moe_call": m * moe * ((plan.ep > 1) + (plan.etp > 1)),  # each exchange: its counts, then rows
    }


def overhead_s(profile: ModelProfile, cluster: Cluster, plan: Plan) -> float:
    """Seconds per step of fixed costs: sum over FEATURES of Cluster.overheads[feature] x its count."""
    if not cluster.overheads:
        return 0.0
    counts = call_counts(profile, plan)
    return sum(cluster.overheads.get(name, 0.0) * counts[name] for name in FEATURES)
