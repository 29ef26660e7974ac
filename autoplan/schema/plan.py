"""How: the Plan (parallel degrees, sharding, recomputation, batch, pipeline schedule) and `check_plan`,
which holds it against the model and the cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from autoplan.errors import InvalidPlanError
from autoplan.schema.base import MAX_GLOBAL_BATCH, MAX_GPUS, SCHEMA_VERSION, _Noun
from autoplan.schema.cluster import Cluster
from autoplan.schema.profile import ModelProfile

Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"]
Recompute = Literal["none", "selective", "full"]
Offload = Literal["none", "optimizer", "params"]


def chunks_per_rank(schedule: str, virtual_stages: int) -> int:
    """Model chunks a pipeline rank holds: gpipe and 1f1b have one whatever virtual_stages says."""
    return virtual_stages if schedule in ("interleaved-1f1b", "zero-bubble") else 1


class Plan(_Noun):
    """How to train: parallel degrees, sharding, recomputation, batch and pipeline schedule."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    dp: int = Field(1, ge=1, le=MAX_GPUS, description="Data-parallel degree.")
    tp: int = Field(1, ge=1, le=MAX_GPUS, description="Tensor-parallel degree (Megatron column/row split).")
    pp: int = Field(1, ge=1, le=MAX_GPUS, description="Pipeline stages.")
    cp: int = Field(1, ge=1, le=MAX_GPUS, description="Context-parallel degree (sequence split across ranks, ring attention).")
    ep: int = Field(1, ge=1, le=MAX_GPUS, description="Expert-parallel degree for MoE layers (folded over dp*cp*tp ranks).")
    etp: int = Field(1, ge=1, le=MAX_GPUS, description="Expert tensor-parallel degree: each routed expert's FFN split over "
                                                       "etp ranks (column/row), folded with ep over dp*cp*tp ranks "
                                                       "(Megatron-Core's expert_tensor_parallel_size). 1: experts whole.")
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters (FSDP).")
    recompute: Recompute = Field("none", description="Activation recomputation: none, selective (attention core) or full.")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism on the tp group (no effect when tp=1).")
    micro_batch_size: int = Field(1, ge=1, le=MAX_GLOBAL_BATCH, description="Sequences per micro-batch per data-parallel replica.")
    global_batch_size: int = Field(ge=1, le=MAX_GLOBAL_BATCH, description="Sequences per optimizer step, all replicas together.")
    schedule: Schedule = Field("1f1b", description="Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zero-bubble.")
    virtual_stages: int = Field(1, ge=1, le=1024, description="Model chunks per pipeline rank (interleaved schedules).")
    layers_per_stage: list[int] | None = Field(None, description="Blocks per pipeline chunk (pp*virtual_stages entries); None: as even as possible.")
    recompute_per_stage: list[Recompute] | None = Field(None, description="Recompute per pipeline stage (pp entries), overriding `recompute`.")
    offload: Offload = Field("none", description="What lives in host memory: none; optimizer (fp32 master weights and "
                                                 "moments, the Adam step on the CPU: ZeRO-Offload); params (also the "
                                                 "sharded parameters and gradients: FSDP2's CPUOffloadPolicy, zero_stage 3).")

    @model_validator(mode="after")
    def _self_consistent(self) -> Plan:
        if self.global_batch_size % self.dp:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by dp={self.dp}")
        per_replica = self.global_batch_size // self.dp
        if per_replica % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} does not divide the "
                             f"{per_replica} sequences per data-parallel replica")
        if self.virtual_stages > 1 and self.schedule not in ("interleaved-1f1b", "zero-bubble"):
            raise ValueError(f"virtual_stages={self.virtual_stages} needs schedule interleaved-1f1b or zero-bubble, not {self.schedule}")
        if self.virtual_stages > 1 and self.pp == 1:
            raise ValueError(f"virtual_stages={self.virtual_stages} needs pp > 1")
        chunks = self.pp * self.virtual_stages
        if self.layers_per_stage is not None and len(self.layers_per_stage) != chunks:
            raise ValueError(f"layers_per_stage has {len(self.layers_per_stage)} entries but pp*virtual_stages = {chunks}")
        if self.recompute_per_stage is not None and len(self.recompute_per_stage) != self.pp:
            raise ValueError(f"recompute_per_stage has {len(self.recompute_per_stage)} entries but pp = {self.pp}")
        if self.offload == "params" and self.zero_stage != 3:
            raise ValueError(f"offload=params needs zero_stage 3 (FSDP2's CPUOffloadPolicy), not {self.zero_stage}")
        if self.etp > 1 and (self.dp * self.cp * self.tp) % (self.ep * self.etp):
            raise ValueError(f"ep*etp = {self.ep}*{self.etp} does not divide dp*cp*tp = {self.dp * self.cp * self.tp}")
        return self

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def expert_data_parallel(self) -> int:
        """Ranks holding the same expert shards: the dp x cp x tp ranks of a stage, ep x etp of them splitting
        the experts (ep by experts, etp each expert's width)."""
        return self.dp * self.cp * self.tp // (self.ep * self.etp)

    @property
    def expert_sharded(self) -> bool:
        """Experts are split over ranks (ep or etp > 1): the executor builds the expert mesh for them."""
        return self.ep * self.etp > 1

    @property
    def chunks_per_rank(self) -> int:
        return chunks_per_rank(self.schedule, self.virtual_stages)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.dp * self.micro_batch_size)

    def stage_recompute(self, stage: int) -> Recompute:
        return self.recompute_per_stage[stage] if self.recompute_per_stage else self.recompute

    def describe(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}", f"cp={self.cp}", f"ep={self.ep}",
                 *([f"etp={self.etp}"] if self.etp > 1 else []), f"zero={self.zero_stage}", f"recompute={self.recompute}",
                 f"sp={'on' if self.sequence_parallel and self.tp > 1 else 'off'}",
                 f"mbs={self.micro_batch_size}", f"gbs={self.global_batch_size}", f"schedule={self.schedule}"]
        if self.virtual_stages > 1:
            parts.append(f"v={self.virtual_stages}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        return " ".join(parts)


def check_plan(profile: ModelProfile, cluster: Cluster, plan: Plan) -> None:
    """Raise InvalidPlanError with the numbers if the plan contradicts the model or the cluster."""
    if plan.gpus != cluster.num_gpus:
        raise InvalidPlanError(f"dp*tp*pp*cp = {plan.dp}*{plan.tp}*{plan.pp}*{plan.cp} = {plan.gpus} "
                               f"but the cluster has {cluster.num_gpus} GPUs")
    if profile.num_heads and profile.num_heads % plan.tp:
        raise InvalidPlanError(f"tp={plan.tp} does not divide {profile.num_heads} heads")
    if profile.num_kv_heads and profile.num_kv_heads % plan.tp:
        raise InvalidPlanError(f"tp={plan.tp} does not divide {profile.num_kv_heads} key/value heads")
    chunks = plan.pp * plan.virtual_stages
    if chunks > profile.num_blocks:
        raise InvalidPlanError(f"pp*virtual_stages = {chunks} exceeds the model's {profile.num_blocks} layers")
    if plan.layers_per_stage is not None:
        if min(plan.layers_per_stage) < 0 or sum(plan.layers_per_stage) != profile.num_blocks:
            raise InvalidPlanError(f"layers_per_stage sums to {sum(plan.layers_per_stage)} "
                                   f"but the model has {profile.num_blocks} layers")
    if plan.cp > 1 and profile.seq_len % (2 * plan.cp):
        raise InvalidPlanError(f"cp={plan.cp} needs seq_len divisible by 2*cp = {2 * plan.cp}, got {profile.seq_len}")
    if plan.ep > 1:
        if not profile.num_experts:
            raise InvalidPlanError(f"ep={plan.ep} but the model has no experts")
        if profile.num_experts % plan.ep:
            raise InvalidPlanError(f"ep={plan.ep} does not divide {profile.num_experts} experts")
        if (plan.dp * plan.cp * plan.tp) % plan.ep:
            raise InvalidPlanError(f"ep={plan.ep} does not divide dp*cp*tp = {plan.dp * plan.cp * plan.tp}")
    if plan.etp > 1:
        if not profile.num_experts:
            raise InvalidPlanError(f"etp={plan.etp} but the model has no experts")
        width = profile.expert_ffn_hidden
        if width and width % plan.etp:
            raise InvalidPlanError(f"etp={plan.etp} does not divide the experts' width {width}")
