"""Price a recorded training step: what the time dry run (executor.timetrace) saw one rank execute,
timed with the same formulas the analytic estimate uses, on a compute and a communication stream.

The trace is plain data, one TraceEvent per op in the order the rank issued them:
- compute ops: a GEMM (its FLOPs), a fused attention kernel (its FLOPs, causal or not), or a memory-bound
  op (the bytes it reads and writes), priced with costmodel.compute's gemm_time_s, attention_core_time_s
  and memory_bound_time_s, the estimate's own per-op formulas;
- collectives (kind, message bytes M as costmodel.comm counts them, the group's size and placement on
  nodes), priced with costmodel.comm's group_* formulas; pipeline sends and receives are left to the
  pipeline formula (costmodel.pipeline), as the estimate does;
- waits: where the compute stream waits for a collective (an op that reads its result, a synchronous
  call, the end of a backward pass that DDP and FSDP close by waiting for their reductions).

Two streams (module `simulate`): compute ops run back to back on the compute stream; a collective starts
on the communication stream once that stream is free, the ops it reads have finished and, unless issued
from a communication stream that does not wait for compute (FSDP's all-gathers), the compute work issued
before it is done (NCCL's stream waits for the current stream at each call); an op that reads
a collective's result (or a wait) starts no earlier than the collective's end, and the compute stream's
idle time is that collective's *exposed* time. Ops the executor runs on a communication stream (FSDP's
copy-in and post-reduce work) run on that stream. What this ignores: the CPU's own dispatch time (a GPU
runs ahead of it), several collectives at once on one link, and kernels sharing the GPU.

A rank's step (`step_time`): without a pipeline, the trace of one step that ran k of the plan's m
micro-batches, plus m - k more of its first micro-batch (gradient accumulation repeats it); with one, the
forward and backward of each pipeline rank per micro-batch go into costmodel.pipeline.pipeline_step_s
(bubble, p2p), and the work after the last backward (gradient averaging, optimizer step) comes on top,
as in the estimate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from autoplan.costmodel import comm
from autoplan.costmodel.compute import CAUSAL_ATTENTION_WORK_FRACTION, attention_core_time_s, gemm_time_s, \
    is_streaming_op, memory_bound_time_s, optimizer_time_s, streaming_time_s
from autoplan.costmodel.pipeline import pipeline_step_s
from autoplan.schema import Cluster, Plan

COMPUTE_KINDS = ("gemm", "attention", "memory")
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send", "recv")
PHASES = ("forward", "backward", "recompute", "optimizer", "sync")
# the estimate's time_breakdown keys (costmodel.estimate._assemble)
CATEGORIES = ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm", "pp_comm", "pp_bubble", "dp_comm_exposed",
              "optimizer", "overhead")
_AXIS_CATEGORY = {"tp": "tp_comm", "cp": "cp_comm", "ep": "ep_comm", "pp": "pp_comm", "dp": "dp_comm_exposed"}


@dataclass(frozen=True)
class TraceEvent:
    """One op of a recorded step (see the module docstring). Sizes are per rank, bytes and FLOPs as run."""

    index: int
    kind: str                      # COMPUTE_KINDS, COLLECTIVE_KINDS or "wait"
    op: str                        # the torch op, e.g. "aten.mm.default", "c10d._allgather_base_.default"
    phase: str                     # PHASES
    micro_batch: int = 0           # the micro-batch a step without pipeline was running (0-based)
    stream: str = "compute"        # "comm" for ops the executor runs on a communication stream
    waits_for_compute: bool = True  # a collective or comm-stream op starts after the compute issued before it
    flops: float = 0.0
    bytes_moved: float = 0.0       # memory-bound: read + written; collective: M as costmodel.comm counts it
    causal: bool = False           # attention under a causal mask
    shapes: tuple = ()             # of the op's tensor inputs
    group_size: int = 1
    group_nodes: int = 1           # nodes the group spans (the cluster's gpus_per_node at record time)
    group_ranks_per_node: int = 1
    axis: str = ""                 # "tp", "cp", "dp", "ep", "pp" for collectives
    after: tuple[int, ...] = ()    # indices of the events whose results this one waits for

    @property
    def is_collective(self) -> bool:
        return self.kind in COLLECTIVE_KINDS

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def op_time_s(event: TraceEvent, cluster: Cluster) -> float:
    """Seconds one op takes on its stream, by the estimate's formulas: gemm_time_s(flops) for a GEMM,
    attention_core_time_s(flops, causal fraction) for a fused attention, memory_bound_time_s(bytes) for
    the rest (streaming_time_s for copies,
    indexing and add/mul; optimizer_time_s inside the optimizer step) (GEMM and attention at the cluster's sustained clock); a collective by costmodel.comm on its group's placement (a broadcast priced as an
    all-gather of the same bytes, the ring's M/B; a send or receive alpha + M/B on its link)."""
    clock = cluster.sustained_clock_fraction  # tensor-core work at the sustained clock, as the estimate prices it
    if event.kind == "gemm":
        return gemm_time_s(flops=event.flops, cluster=cluster) / clock
    if event.kind == "attention":
        causal = CAUSAL_ATTENTION_WORK_FRACTION if event.causal else 1.0
        return attention_core_time_s(flops=event.flops, causal_fraction=causal, cluster=cluster) / clock
    if event.kind == "memory" and event.phase == "optimizer":
        return optimizer_time_s(bytes_moved=event.bytes_moved, cluster=cluster)
    if event.kind == "memory" and is_streaming_op(event.op):
        return streaming_time_s(bytes_moved=event.bytes_moved, cluster=cluster)
    if event.kind == "memory":
        return memory_bound_time_s(bytes_moved=event.bytes_moved, cluster=cluster)
    if not event.is_collective or event.group_size <= 1:
        return 0.0
    topo = comm.GroupTopology(group_size=event.group_size, ranks_per_node=event.group_ranks_per_node,
                              nodes=event.group_nodes)
    if event.kind in ("send", "recv"):
        link = cluster.intra_node if topo.intra_node else cluster.inter_node
        return comm.p2p_s(message_bytes=event.bytes_moved, link=link)
    price = {"all_reduce": comm.group_all_reduce_s, "all_gather": comm.group_all_gather_s,
             "broadcast": comm.group_all_gather_s, "reduce_scatter": comm.group_reduce_scatter_s,
             "all_to_all": comm.group_all_to_all_s}[event.kind]
    return price(message_bytes=event.bytes_moved, topo=topo, cluster=cluster)


def category(event: TraceEvent) -> str:
    """The estimate's time_breakdown key an event's time belongs to: a collective's axis, but recomputation's
    (the estimate counts the collectives a recomputed forward reruns as recompute: costmodel.layers)."""
    if event.phase == "recompute":
        return "recompute"
    if event.is_collective:
        return _AXIS_CATEGORY.get(event.axis, "dp_comm_exposed")
    if event.phase in ("optimizer", "sync"):
        return "optimizer"
    return "compute"


@dataclass
class StreamTimes:
    """What `simulate` found: the compute stream's time split by (category, phase, micro-batch), the time
    each category's collectives spent on the link, and the pipeline sends (bytes each)."""

    critical_s: dict[tuple[str, str, int], float] = field(default_factory=lambda: defaultdict(float))
    link_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    sends_bytes: list[float] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.critical_s.values())

    def by_category(self, *, phases: Sequence[str] = PHASES, micro_batch: int | None = None) -> dict[str, float]:
        out = dict.fromkeys(CATEGORIES, 0.0)
        for (name, phase, mb), seconds in self.critical_s.items():
            if phase in phases and (micro_batch is None or mb == micro_batch):
                out[name] += seconds
        return out

    def phase_s(self, *phases: str) -> float:
        return sum(s for (_, phase, _), s in self.critical_s.items() if phase in phases)


def simulate(events: Sequence[TraceEvent], cluster: Cluster) -> StreamTimes:
    """Run the trace on a compute and a communication stream (module docstring); every second of the
    compute stream's timeline, busy or waiting, is attributed to a category, the phase and micro-batch of
    the op that waited or ran. Collectives still running at the end are waited for there."""
    times = StreamTimes()
    compute_clock = comm_clock = 0.0
    finish: dict[int, float] = {}           # event index -> when it ended (comm-stream ops and collectives)
    category_of: dict[int, str] = {}
    pending: set[int] = set()              # collectives the compute stream has not yet waited for
    collectives: dict[int, tuple[TraceEvent, float]] = {}  # index -> (event, seconds on the link)
    exposed: dict[int, float] = defaultdict(float)         # index -> seconds the compute stream waited for it
    for event in events:
        if event.kind in ("send", "recv") and event.axis == "pp":
            if event.kind == "send":
                times.sends_bytes.append(event.bytes_moved)
            continue
        ready = max((finish.get(i, 0.0) for i in event.after), default=0.0)
        if event.is_collective or event.stream == "comm":
            duration = op_time_s(event, cluster)
            start = max(comm_clock, ready, compute_clock if event.waits_for_compute else 0.0)
            comm_clock = finish[event.index] = start + duration
            category_of[event.index] = category(event)
            if event.is_collective:
                times.link_s[category(event)] += duration
                pending.add(event.index)
                collectives[event.index] = (event, duration)
            continue
        if ready > compute_clock:  # the compute stream waits: exposed communication
            waited_for = max(event.after, key=lambda i: finish.get(i, 0.0))
            exposed[waited_for] += ready - compute_clock
            times.critical_s[(category_of.get(waited_for, "dp_comm_exposed"), event.phase, event.micro_batch)] += \
                ready - compute_clock
            compute_clock = ready
        pending.difference_update(event.after)
        duration = op_time_s(event, cluster)
        times.critical_s[(category(event), event.phase, event.micro_batch)] += duration
        compute_clock += duration
    last = events[-1] if events else None
    for index in sorted(pending, key=finish.__getitem__):
        if finish[index] > compute_clock:
            times.critical_s[(category_of[index], "sync", last.micro_batch)] += finish[index] - compute_clock
            exposed[index] += finish[index] - compute_clock
            compute_clock = finish[index]
    # what a collective hid behind compute still slows that compute by the cluster's overlap_slowdown
    # (costmodel.data_parallel.overlapped_s: max(0, comm - compute) + κ·min(comm, compute))
    for index, (event, duration) in collectives.items():
        hidden = max(0.0, duration - exposed[index])
        if hidden and cluster.overlap_slowdown:
            times.critical_s[(category_of[index], event.phase, event.micro_batch)] += cluster.overlap_slowdown * hidden
    return times


@dataclass(frozen=True)
class StageTime:
    """One pipeline rank's priced trace: per micro-batch forward and backward (recompute included) on
    the compute stream but the waits for data-parallel collectives, the work after the last backward with
    those waits (once per step under a pipeline schedule), and its time split by category."""

    stage: int
    fwd_s: float
    bwd_s: float
    after_backward_s: float
    per_micro_batch: dict[str, float]    # category -> seconds of one micro-batch (forward + backward)
    after_backward: dict[str, float]     # category -> seconds after the last backward
    step_s: float                        # without pipeline: the rank's whole step
    breakdown: dict[str, float]          # without pipeline: the whole step by category
    p2p_bytes: float = 0.0               # the largest pipeline send


def stage_time(events: Sequence[TraceEvent], cluster: Cluster, *, stage: int, micro_batches_run: int,
               micro_batches: int) -> StageTime:
    """Price one rank's trace of a step that ran `micro_batches_run` of the plan's `micro_batches`."""
    times = simulate(events, cluster)
    k = max(micro_batches_run, 1)
    passes = ("forward", "backward", "recompute")
    # without pipeline: the step ran k micro-batches; the m - k not run repeat the first (accumulation)
    first = times.by_category(phases=passes, micro_batch=0)
    breakdown = {name: times.by_category()[name] + (micro_batches - k) * first[name] for name in CATEGORIES}
    # with one: the data-parallel waits are once per step (torch's schedule gathers FSDP's parameters at the
    # first forward and reduces after the last backward; DDP's arithmetic runs after the schedule), the rest
    # is per micro-batch
    in_passes = times.by_category(phases=passes)
    data_parallel = in_passes["dp_comm_exposed"]
    per_mb = {name: (0.0 if name == "dp_comm_exposed" else s / k) for name, s in in_passes.items()}
    after = times.by_category(phases=("optimizer", "sync"))
    after["dp_comm_exposed"] += data_parallel
    fwd_dp = times.by_category(phases=("forward",))["dp_comm_exposed"]
    return StageTime(stage=stage, fwd_s=(times.phase_s("forward") - fwd_dp) / k,
                     bwd_s=(times.phase_s("backward", "recompute") - (data_parallel - fwd_dp)) / k,
                     after_backward_s=sum(after.values()), per_micro_batch=per_mb, after_backward=after,
                     step_s=sum(breakdown.values()), breakdown=breakdown,
                     p2p_bytes=max(times.sends_bytes, default=0.0))


def step_time(stages: Sequence[StageTime], plan: Plan, cluster: Cluster) -> tuple[float, dict[str, float]]:
    """(step seconds, breakdown by the estimate's categories) of the plan from its ranks' priced traces,
    one StageTime per pipeline rank (in order). Without pipeline the rank's own step. With one, the
    estimate's pipeline formula on the ranks' per-micro-batch times and the largest send (p2p between
    stages tp*cp*dp ranks apart), plus the slowest rank's work after its last backward."""
    if plan.pp == 1:
        only = stages[0]
        return only.step_s, dict(only.breakdown)
    p2p_s = comm.p2p_between_stages_s(message_bytes=max(s.p2p_bytes for s in stages),
                                      stage_stride_ranks=plan.tp * plan.cp * plan.dp, cluster=cluster)
    pipe = pipeline_step_s(schedule=plan.schedule, stage_fwd_s=[s.fwd_s for s in stages],
                           stage_bwd_s=[s.bwd_s for s in stages], num_micro_batches=plan.num_micro_batches,
                           virtual_stages=plan.virtual_stages, p2p_s=p2p_s)
    slowest = max(stages, key=lambda s: s.fwd_s + s.bwd_s)
    tail = max(stages, key=lambda s: s.after_backward_s)
    breakdown = {name: plan.num_micro_batches * slowest.per_micro_batch[name] + tail.after_backward[name]
                 for name in CATEGORIES}
    breakdown["pp_comm"] += pipe.p2p_s
    breakdown["pp_bubble"] += pipe.bubble_s
    return pipe.total_s + tail.after_backward_s, breakdown
