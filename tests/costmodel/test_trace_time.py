"""Pricing a recorded step (costmodel.trace_time): the per-op prices are the estimate's formulas, and the
two-stream simulation exposes exactly the communication that nothing covers."""

import pytest

import autoplan as ap
from autoplan.costmodel import comm
from autoplan.costmodel.compute import attention_core_time_s, gemm_time_s, memory_bound_time_s
from autoplan.costmodel.pipeline import pipeline_step_s
from autoplan.costmodel.trace_time import CATEGORIES, TraceEvent, op_time_s, simulate, stage_time, step_time

# the formulas at an ideal clock and with perfect overlap; test_sustained_clock_and_overlap_as_the_estimate
# covers the preset's fitted values
CLUSTER = ap.Cluster.preset("dgx-h100", gpus=16).model_copy(update={"sustained_clock_fraction": 1.0,
                                                                    "overlap_slowdown": 0.0})
GEMM_FLOPS = 2 * 4096 * 4096 * 4096


def gemm(index, phase="forward", micro_batch=0, after=()):
    return TraceEvent(index=index, kind="gemm", op="aten.mm.default", phase=phase, micro_batch=micro_batch,
                      flops=GEMM_FLOPS, after=after)


def all_reduce(index, nbytes, *, axis="tp", phase="forward", after=(), waits_for_compute=True, size=8, nodes=1):
    return TraceEvent(index=index, kind="all_reduce", op="c10d.allreduce_.default", phase=phase, bytes_moved=nbytes,
                      group_size=size, group_nodes=nodes, group_ranks_per_node=size // nodes, axis=axis, after=after,
                      waits_for_compute=waits_for_compute)


def test_op_prices_are_the_estimates_formulas():
    """Oracle: costmodel.compute and costmodel.comm called directly; a group of one rank costs nothing."""
    assert op_time_s(gemm(0), CLUSTER) == gemm_time_s(flops=GEMM_FLOPS, cluster=CLUSTER)
    attention = TraceEvent(index=0, kind="attention", op="sdpa", phase="forward", flops=1e12, causal=True)
    assert op_time_s(attention, CLUSTER) == attention_core_time_s(flops=1e12, causal_fraction=0.5, cluster=CLUSTER)
    memory = TraceEvent(index=0, kind="memory", op="aten.add.Tensor", phase="forward", bytes_moved=3e9)
    assert op_time_s(memory, CLUSTER) == memory_bound_time_s(bytes_moved=3e9, cluster=CLUSTER)
    topo = comm.GroupTopology(group_size=16, ranks_per_node=8, nodes=2)
    assert op_time_s(all_reduce(0, 1e9, size=16, nodes=2), CLUSTER) == \
        comm.group_all_reduce_s(message_bytes=1e9, topo=topo, cluster=CLUSTER)
    assert op_time_s(all_reduce(0, 1e9, size=1), CLUSTER) == 0.0


def test_sustained_clock_and_overlap_as_the_estimate():
    """The estimate's physics: GEMMs at the sustained clock (t / clock), and a collective hidden behind
    compute still adds overlap_slowdown of its hidden part (costmodel.data_parallel.overlapped_s)."""
    fitted = CLUSTER.model_copy(update={"sustained_clock_fraction": 0.8, "overlap_slowdown": 0.5})
    assert op_time_s(gemm(0), fitted) == pytest.approx(op_time_s(gemm(0), CLUSTER) / 0.8)
    t_gemm = op_time_s(gemm(0), fitted)
    nbytes = 2e7
    t_comm = op_time_s(all_reduce(2, nbytes, axis="dp", waits_for_compute=False), fitted)
    assert t_comm < 2 * t_gemm  # hidden entirely behind the two GEMMs before the read
    events = [gemm(0), gemm(1), all_reduce(2, nbytes, axis="dp", waits_for_compute=False), gemm(3, after=(2,))]
    assert simulate(events, fitted).total_s == pytest.approx(3 * t_gemm + 0.5 * t_comm)


def test_a_collective_read_at_once_is_exposed_and_one_read_later_hides():
    """GEMM a, its all-reduce c (reads a), GEMM b, then d reads c: c runs while b does, so the compute
    stream waits max(0, t_c - t_b) before d. Total = t_a + max(t_b, t_c) + t_d."""
    t_gemm = op_time_s(gemm(0), CLUSTER)
    nbytes = 4e9  # about 20 ms on NVLink: longer than a GEMM of 2·4096³ FLOPs (about 0.2 ms)
    t_comm = op_time_s(all_reduce(1, nbytes), CLUSTER)
    assert t_comm > t_gemm
    events = [gemm(0), all_reduce(1, nbytes, after=(0,)), gemm(2), gemm(3, after=(1,))]
    times = simulate(events, CLUSTER)
    assert times.total_s == pytest.approx(t_gemm + max(t_gemm, t_comm) + t_gemm)
    assert times.by_category()["tp_comm"] == pytest.approx(t_comm - t_gemm)
    assert times.link_s["tp_comm"] == pytest.approx(t_comm)
    # read by nothing: waited for at the end of the trace, the same exposure
    assert simulate(events[:3], CLUSTER).total_s == pytest.approx(t_gemm + t_comm)


def test_a_gather_that_does_not_wait_for_compute_overlaps_what_came_before():
    """An FSDP-style all-gather (its stream waits for no compute) issued after two GEMMs starts at 0:
    the op reading it waits max(0, t_c - 2·t_gemm)."""
    t_gemm = op_time_s(gemm(0), CLUSTER)
    nbytes = 2e8
    t_comm = op_time_s(all_reduce(2, nbytes, axis="dp", waits_for_compute=False), CLUSTER)
    events = [gemm(0), gemm(1), all_reduce(2, nbytes, axis="dp", waits_for_compute=False), gemm(3, after=(2,))]
    assert simulate(events, CLUSTER).total_s == pytest.approx(max(2 * t_gemm, t_comm) + t_gemm)


def test_without_pipeline_the_step_repeats_the_first_micro_batch():
    """A step traced with 2 of 5 micro-batches (3 GEMMs each, an optimizer op after): the 3 not run repeat
    micro-batch 0, so the step is 3·t_gemm·(2 + 3) + t_opt."""
    opt = TraceEvent(index=6, kind="memory", op="aten.add_.Tensor", phase="optimizer", bytes_moved=1e9)
    events = [gemm(i, micro_batch=i // 3) for i in range(6)] + [opt]
    t_gemm, t_opt = op_time_s(gemm(0), CLUSTER), op_time_s(opt, CLUSTER)
    timing = stage_time(events, CLUSTER, stage=0, micro_batches_run=2, micro_batches=5)
    plan = ap.Plan(dp=16, global_batch_size=80)
    step_s, breakdown = step_time([timing], plan, CLUSTER)
    assert step_s == pytest.approx(15 * t_gemm + t_opt)
    assert breakdown["compute"] == pytest.approx(15 * t_gemm) and breakdown["optimizer"] == pytest.approx(t_opt)
    assert set(breakdown) == set(CATEGORIES)


def test_pipeline_stages_go_through_the_pipeline_formula():
    """Oracle: costmodel.pipeline.pipeline_step_s on the ranks' per-micro-batch forward and backward, with
    the largest send priced as the estimate prices a pipeline p2p; plus the slowest after-backward work."""
    plan = ap.Plan(pp=2, dp=8, global_batch_size=64, schedule="1f1b")
    send = TraceEvent(index=4, kind="send", op="c10d.send.default", phase="forward", bytes_moved=5e7, group_size=16,
                      axis="pp")
    stages = []
    for stage, backward_gemms in ((0, 2), (1, 3)):
        events = [gemm(0), gemm(1)] + [gemm(2 + i, phase="backward") for i in range(backward_gemms)] + [send]
        stages.append(stage_time(events, CLUSTER, stage=stage, micro_batches_run=2, micro_batches=8))
    t_gemm = op_time_s(gemm(0), CLUSTER)
    p2p = comm.p2p_between_stages_s(message_bytes=5e7, stage_stride_ranks=8, cluster=CLUSTER)
    expected = pipeline_step_s(schedule="1f1b", stage_fwd_s=[t_gemm, t_gemm], stage_bwd_s=[t_gemm, 1.5 * t_gemm],
                               num_micro_batches=8, p2p_s=p2p)
    step_s, breakdown = step_time(stages, plan, CLUSTER)
    assert step_s == pytest.approx(expected.total_s)
    assert breakdown["pp_bubble"] == pytest.approx(expected.bubble_s)
    assert sum(breakdown.values()) == pytest.approx(step_s)


def test_streaming_and_optimizer_ops_at_their_measured_rates():
    """Oracle: bytes / (bandwidth x efficiency) by hand. An add (a streaming op) at streaming_efficiency, a gelu at
    memory_bound_efficiency, an op inside the optimizer step at optimizer_efficiency; unmeasured (None), all three
    fall back to memory_bound_efficiency (the presets)."""
    measured = CLUSTER.model_copy(update={"streaming_efficiency": 0.9, "optimizer_efficiency": 1.5,
                                          "memory_bound_efficiency": 0.2})
    bandwidth = measured.memory_bandwidth_bytes_per_s

    def memory(op, phase="forward"):
        return TraceEvent(index=0, kind="memory", op=op, phase=phase, bytes_moved=3e9)

    assert op_time_s(memory("aten.add.Tensor"), measured) == pytest.approx(3e9 / (bandwidth * 0.9))
    assert op_time_s(memory("aten.index_copy.default"), measured) == pytest.approx(3e9 / (bandwidth * 0.9))
    assert op_time_s(memory("aten.gelu.default"), measured) == pytest.approx(3e9 / (bandwidth * 0.2))
    assert op_time_s(memory("aten.addcdiv_.default", "optimizer"), measured) == pytest.approx(3e9 / (bandwidth * 1.5))
    for op in ("aten.add.Tensor", "aten.gelu.default"):
        assert op_time_s(memory(op), CLUSTER) == memory_bound_time_s(bytes_moved=3e9, cluster=CLUSTER)
