"""The answer: what the cost model predicts (Estimate) and what a dry run measured (DryRunResult, one
StageMemory per pipeline stage run)."""

from __future__ import annotations

from pydantic import Field, PrivateAttr

from autoplan.schema.base import SCHEMA_VERSION, _Noun
from autoplan.schema.cluster import Cluster
from autoplan.schema.plan import Plan


class Estimate(_Noun):
    """What the cost model predicts for (ModelProfile, Cluster, Plan)."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    step_time_s: float = Field(description="Time of one optimizer step.")
    tokens_per_s: float = Field(description="Training throughput of the whole job.")
    mfu: float = Field(description="Model FLOPs utilisation: model FLOPs per second / (GPUs x peak).")
    model_flops_per_gpu_per_s: float = Field(description="Model FLOPs (no recompute) per second per GPU.")
    hardware_flops_per_gpu_per_s: float = Field(description="FLOPs executed per second per GPU, recompute included.")
    memory_per_gpu_bytes: int = Field(description="Peak memory of the fullest rank.")
    memory_limit_bytes: int = Field(description="GPU memory per rank.")
    fits: bool = Field(description="memory_per_gpu_bytes <= memory_limit_bytes (and the host memory within its limit).")
    host_memory_per_gpu_bytes: int = Field(0, description="Host memory the fullest rank's offloaded states take (Plan.offload).")
    host_memory_limit_bytes: int = Field(0, description="Host memory per GPU (Cluster.host_memory_per_gpu_bytes).")
    step_time_band_s: tuple[float, float] | None = Field(None, description="Where the step time falls for most runs: the "
                                                                            "cross-validated error band of the published runs "
                                                                            "(costmodel.bands) around step_time_s.")
    memory_band_bytes: tuple[int, int] | None = Field(None, description="memory_per_gpu_bytes within the dry-run grid's "
                                                                         "tolerance (costmodel.bands).")
    memory_at_risk: bool = Field(False, description="Fits by the estimate, but the top of memory_band_bytes does not.")
    peak_stage: int = Field(0, description="Pipeline stage whose ranks hold the most memory.")
    memory_per_stage_bytes: list[int] = Field(default_factory=list, description="Peak memory per GPU of each pipeline stage.")
    time_breakdown: dict[str, float] = Field(description="Seconds of the step by cause (compute, recompute, tp_comm, ...).")
    memory_breakdown: dict[str, int] = Field(description="Bytes of the peak rank by category (params, grads, optimizer, ...).")
    notes: list[str] = Field(default_factory=list, description="Assumptions the estimate made that the user should know.")



class StageMemory(_Noun):
    """One pipeline stage's fullest rank in a dry run: its peak tensor memory and what it holds then."""

    stage: int = Field(description="Pipeline stage (0 for a plan without pipeline).")
    rank: int = Field(description="Global rank that was run (dp, cp, tp and ep coordinates 0: the largest shards).")
    peak_memory_bytes: int = Field(description="Peak bytes of tensors on this rank's GPU.")
    memory_breakdown: dict[str, int] = Field(description="Bytes at the peak by category: params, grads, optimizer, "
                                                         "activations, temporaries, buffers.")
    peak_phase: str = Field(description="When the peak happened, e.g. 'step 2 backward'.")
    host_memory_bytes: int = Field(0, description="Most bytes of offloaded states in host memory (Plan.offload).")
    fwd_s: float | None = Field(None, description="Time dry run: seconds of one micro-batch's forward on this rank "
                                                  "(compute and exposed communication, priced by costmodel.trace_time).")
    bwd_s: float | None = Field(None, description="Time dry run: seconds of one micro-batch's backward, recompute included.")
    after_backward_s: float | None = Field(None, description="Time dry run: seconds after the last backward (gradient "
                                                             "averaging, optimizer step).")
    trace_ops: int | None = Field(None, description="Time dry run: events recorded in this rank's traced step.")


class DryRunResult(_Noun):
    """What a dry run measured: the executor's own code run for one rank of an N-rank job on a fake process
    group with fake tensors, every tensor byte counted (executor.dryrun)."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    model: str = Field(description="Model that was run (built-in name, model.py path or class name).")
    plan: Plan = Field(description="The plan that was applied.")
    gpus: int = Field(description="Ranks of the simulated job (dp*tp*pp*cp).")
    seq_len: int = Field(description="Tokens per sequence.")
    precision: str = Field(description="Dtypes of the run: parameters, gradients, optimizer states.")
    steps: int = Field(description="Training steps run (forward, backward, optimizer).")
    micro_batches_per_step: int = Field(description="Micro-batches run per step (a memory-equivalent number; "
                                                    "the plan's may be larger).")
    peak_memory_bytes: int = Field(description="Peak tensor bytes per GPU of the fullest rank (no reserve).")
    host_memory_bytes: int = Field(0, description="Bytes of offloaded states in host memory of that rank (Plan.offload): "
                                                   "counted apart, not in peak_memory_bytes.")
    memory_breakdown: dict[str, int] = Field(description="Bytes of the fullest rank at its peak by category.")
    peak_stage: int = Field(0, description="Pipeline stage of the fullest rank.")
    stages: list[StageMemory] = Field(default_factory=list, description="Each pipeline stage that was run.")
    wall_s: float = Field(0.0, description="Seconds the dry run took.")
    notes: list[str] = Field(default_factory=list, description="How the dry run departed from a real run.")
    step_time_s: float | None = Field(None, description="Time dry run (time=True): seconds per training step, the "
                                                        "traced ops priced on the cluster (costmodel.trace_time).")
    time_breakdown: dict[str, float] | None = Field(None, description="Time dry run: step_time_s by the estimate's "
                                                                      "categories (compute, tp_comm, pp_bubble, ...).")
    cluster: str | None = Field(None, description="Time dry run: the cluster whose formulas priced the trace.")
    _traces: dict = PrivateAttr(default_factory=dict)

    @property
    def traces(self) -> dict:
        """Time dry run: pipeline stage -> its traced step (a list of costmodel.trace_time.TraceEvent)."""
        return self._traces

    def fits(self, cluster: Cluster) -> bool:
        """Peak tensor memory plus the cluster's reserve (context, NCCL, fragmentation) within GPU memory, and the
        offloaded states within the host memory per GPU."""
        host_ok = not self.host_memory_bytes or self.host_memory_bytes <= cluster.host_memory_per_gpu_bytes
        return self.peak_memory_bytes + cluster.memory_reserve_bytes <= cluster.memory_bytes and host_ok
