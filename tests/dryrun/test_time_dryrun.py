"""The time dry run (ap.dryrun(..., time=True)): what the executor runs, recorded op by op and priced."""

from collections import Counter

import pytest

import autoplan as ap
from autoplan.costmodel.trace_time import simulate


@pytest.fixture(scope="module")
def gpt_tiny():
    return ap.profile_model("gpt-tiny")


def test_traced_flops_are_the_models_flops(gpt_tiny):
    """Oracle: the profiler's FLOPs per sequence (torch.utils.flop_counter over each layer's forward and
    backward on meta): one micro-batch of the traced step runs exactly those, forward and backward."""
    plan = ap.Plan(dp=2, global_batch_size=4)
    dry = ap.dryrun("gpt-tiny", plan, time=True)
    events = dry.traces[0]
    fwd = sum(e.flops for e in events if e.phase == "forward" and e.micro_batch == 0)
    bwd = sum(e.flops for e in events if e.phase == "backward" and e.micro_batch == 0)
    assert fwd == pytest.approx(sum(layer.fwd_flops for layer in gpt_tiny.layers) * plan.micro_batch_size, rel=1e-9)
    assert bwd == pytest.approx(sum(layer.bwd_flops for layer in gpt_tiny.layers) * plan.micro_batch_size, rel=1e-9)
    # two micro-batches ran, DDP's gradient all-reduce only in the last one's backward
    assert {e.micro_batch for e in events if e.phase == "backward"} == {0, 1}
    ddp = [e for e in events if e.op == "ddp.bucket_all_reduce"]
    assert ddp and all(e.micro_batch == 1 and e.axis == "dp" and e.group_size == 2 for e in ddp)
    assert sum(e.bytes_moved for e in ddp) == 2 * gpt_tiny.total_params  # bf16 gradients, every parameter once


def test_sequence_parallel_collectives_per_block():
    """Oracle: Korthikanti et al. 2022 (Sec. 4.2.2): with sequence parallelism each transformer block's
    forward runs two all-gathers (before the column-parallel GEMMs) and two reduce-scatters (after the
    row-parallel ones) on the tp group, backward the reverse; each over the tp ranks of one node."""
    plan = ap.Plan(tp=2, sequence_parallel=True, global_batch_size=2)
    dry = ap.dryrun("gpt-tiny", plan, time=True)
    blocks = 4
    counts = Counter((e.kind, e.phase) for e in dry.traces[0] if e.is_collective and e.axis == "tp"
                     and e.micro_batch == 0)
    assert counts[("reduce_scatter", "forward")] == 2 * blocks
    assert counts[("all_gather", "backward")] >= 2 * blocks and counts[("all_gather", "forward")] >= 2 * blocks
    tp_events = [e for e in dry.traces[0] if e.is_collective and e.axis == "tp"]
    assert all(e.group_size == 2 and e.group_nodes == 1 for e in tp_events)


def test_time_dry_run_step_is_its_breakdown_and_its_trace_priced():
    """The step and breakdown are the stages' traces priced (costmodel.trace_time), and the breakdown adds up
    to the step: a pipeline of 2 stages (1F1B) and a plan without one."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=4)
    for plan in (ap.Plan(pp=2, dp=2, global_batch_size=8, schedule="1f1b"), ap.Plan(dp=4, global_batch_size=8)):
        dry = ap.dryrun("gpt-tiny", plan, time=True, cluster=cluster)
        assert dry.step_time_s == pytest.approx(sum(dry.time_breakdown.values()), rel=1e-9)
        assert set(dry.traces) == {s.stage for s in dry.stages} == set(range(plan.pp))
        for stage in dry.stages:  # per micro-batch: the passes' time but the (once per step) data-parallel waits
            times = simulate(dry.traces[stage.stage], cluster)
            run = dry.micro_batches_per_step
            passes = ("forward", "backward", "recompute")
            waits = times.by_category(phases=passes)["dp_comm_exposed"]
            assert stage.fwd_s + stage.bwd_s == pytest.approx((times.phase_s(*passes) - waits) / run)
            assert stage.after_backward_s == pytest.approx(times.phase_s("optimizer", "sync") + waits)
        if plan.pp > 1:
            assert dry.time_breakdown["pp_bubble"] > 0 and dry.time_breakdown["pp_comm"] > 0


def test_expert_tensor_parallel_collectives_are_recorded_as_expert_communication():
    """Oracle: executor.expert_parallel's exchanges per MoE layer and forward: ep's counts, dispatch and combine
    (3 all-to-alls over the ep group), and etp's counts, token gather and output reduce-scatter (3 more over the
    etp group); all of them priced as the dispatcher's (axis ep, category ep_comm), none as data-parallel."""
    def forward_all_to_alls(plan):
        dry = ap.dryrun("moe-tiny", plan, time=True)
        events = [e for e in dry.traces[0] if e.kind == "all_to_all" and e.phase == "forward" and e.micro_batch == 0]
        return events, dry

    moe_layers = 4
    ep_only, _ = forward_all_to_alls(ap.Plan(dp=4, ep=2, global_batch_size=8))
    both, dry = forward_all_to_alls(ap.Plan(dp=4, ep=2, etp=2, global_batch_size=8))
    assert len(ep_only) == 3 * moe_layers and len(both) == 6 * moe_layers
    assert all(e.axis == "ep" and e.group_size == 2 for e in both)
    assert dry.time_breakdown["ep_comm"] > 0


def test_ring_attention_bytes_are_what_the_executors_ring_moves(tmp_path):
    """Oracle: the time dry run itself. costmodel.context_parallel prices torch's ring attention by its memory-bound
    bytes per attention layer and micro-batch, in units of the rank's query bytes Q: forward 2 + 16·(cp-1), backward
    34 + 28.5·(cp-1). Measured here on a llama-style model (hidden 256, 2 heads of 128, 1 K/V head repeated, as
    llama3-8b's are): the bytes the executor's forward and backward move at cp ranks over those of dp=cp ranks with
    as many tokens each (same DDP, same loss), for 2 blocks less 1 block (one attention layer's share)."""
    from collections import defaultdict

    from autoplan.costmodel.context_parallel import RING_BACKWARD_Q, RING_FORWARD_Q

    def moved(plan, seq, layers):
        path = tmp_path / f"model_{seq}_{layers}.py"
        path.write_text("import autoplan as ap\n\n\ndef build_model():\n    return ap.models.llama(layers=%d, hidden=256, "
                        "heads=2, kv_heads=1, vocab=512, seq_len=%d, ffn_hidden=512)\n" % (layers, seq))
        out = defaultdict(float)
        for event in ap.dryrun(str(path), plan, time=True)._traces[0]:
            if event.kind == "memory" and event.phase in ("forward", "backward"):
                out[event.phase] += event.bytes_moved
        return out

    q = 256 * 256 * 2  # 256 tokens on the rank, hidden 256, bf16
    for cp in (2, 4):
        ring = [moved(ap.Plan(cp=cp, global_batch_size=1), 256 * cp, layers) for layers in (1, 2)]
        plain = [moved(ap.Plan(dp=cp, global_batch_size=cp), 256, layers) for layers in (1, 2)]
        per_layer = {phase: ((ring[1][phase] - plain[1][phase]) - (ring[0][phase] - plain[0][phase])) / q
                     for phase in ("forward", "backward")}
        fixed, per_step = RING_FORWARD_Q
        assert per_layer["forward"] == pytest.approx(fixed + per_step * (cp - 1), rel=0.02)
        fixed, per_step = RING_BACKWARD_Q
        assert per_layer["backward"] == pytest.approx(fixed + per_step * (cp - 1), rel=0.02)
