"""The dry run: the executor's code for one rank on a fake process group with fake tensors, every tensor
byte counted. Small cases (2 to 8 fake ranks) against exact per-parameter arithmetic, a real 2-rank run,
the plan's full micro-batch count, and the cost model."""

import resource
from pathlib import Path

import pytest
import torch

import autoplan as ap
from autoplan.errors import InvalidPlanError
from autoplan.executor.dryrun import _Model, _run_stage, memory_equivalent_plan
from real_ranks import SMALL_LLAMA, build_small_llama, measure_real

GBS = 8


def _buffers_bytes(model: torch.nn.Module) -> int:
    """Module buffers as the dry run holds them (cast to bf16 with the model)."""
    return sum(b.numel() * (2 if b.is_floating_point() else b.element_size()) for b in model.buffers())


@pytest.mark.parametrize("zero_stage, shard", [(0, 1), (3, 4)])
def test_model_states_are_the_mixed_precision_bytes_per_parameter(zero_stage, shard):
    """Oracle: Rajbhandari et al. 2020, Sec. 3.1 with K = 12: per parameter 2 bytes bf16 weight, 2 bytes bf16
    gradient, 12 bytes fp32 master + momentum + variance; ZeRO-3 divides all three by N_d (here 4; the small
    model's dimensions divide by 4, so FSDP pads nothing). ZeRO-0's DDP buckets hold a second gradient copy."""
    model = build_small_llama()
    psi = sum(p.numel() for p in model.parameters())
    result = ap.dryrun(model, ap.Plan(dp=4, zero_stage=zero_stage, global_batch_size=GBS))
    got = result.memory_breakdown
    assert got["params"] == 2 * psi // shard + _buffers_bytes(model)
    assert got["grads"] == 2 * psi // shard
    assert got["optimizer"] == 12 * psi // shard
    if zero_stage == 0:
        assert got["buffers"] == 2 * psi
    assert result.peak_memory_bytes == sum(got.values())


@pytest.fixture(scope="module")
def real_two_ranks():
    plans = {"dp2 zero3": ap.Plan(dp=2, zero_stage=3, global_batch_size=4),
             "tp2 sp": ap.Plan(tp=2, sequence_parallel=True, global_batch_size=2),
             "pp2 1f1b": ap.Plan(pp=2, global_batch_size=4)}
    return dict(zip(plans, zip(plans.values(), measure_real(list(plans.values())))))


@pytest.mark.parametrize("name", ["dp2 zero3", "tp2 sp", "pp2 1f1b"])
def test_dry_run_agrees_with_a_real_two_rank_run(name, real_two_ranks):
    """Oracle: the same plan run for real on 2 CPU ranks (gloo, real bf16 tensors, the same tracker). Every
    category within 1% of the peak: a real pipeline stage also holds the activation it is still sending."""
    plan, real = real_two_ranks[name]
    dry = ap.dryrun(build_small_llama(), plan, stages="all")
    for measured in real:
        stage = next(s for s in dry.stages if s.stage == measured.stage)
        if stage.rank != measured.rank:
            continue
        assert stage.peak_memory_bytes == pytest.approx(measured.peak_memory_bytes, rel=0.01)
        for category, value in measured.memory_breakdown.items():
            assert abs(stage.memory_breakdown[category] - value) <= 0.01 * measured.peak_memory_bytes, category


@pytest.mark.parametrize("plan", [
    ap.Plan(dp=2, zero_stage=3, global_batch_size=8),
    ap.Plan(pp=2, schedule="1f1b", global_batch_size=8),
    ap.Plan(pp=2, schedule="zero-bubble", global_batch_size=8),
], ids=["dp2 zero3 m=4", "pp2 1f1b m=8", "pp2 zero-bubble m=8"])
def test_fewer_micro_batches_hold_the_same_peak(plan):
    """Oracle: the dry run with all the plan's micro-batches. Gradient accumulation repeats its second
    micro-batch's tensors, a pipeline holds no more after its warm-up, and the receive buffers and tokens it
    holds per micro-batch are added for the ones not run: within 0.01% (a few 8-byte scalars per
    micro-batch are not)."""
    spec = _Model(build_small_llama, "small", SMALL_LLAMA["seq_len"], SMALL_LLAMA["vocab"])
    short = memory_equivalent_plan(plan)
    assert short.num_micro_batches < plan.num_micro_batches
    for stage in sorted({0, plan.pp - 1}):
        full, _, _ = _run_stage(spec, plan, stage, 2, plan)
        fewer, _, _ = _run_stage(spec, short, stage, 2, plan)
        assert fewer.peak_memory_bytes == pytest.approx(full.peak_memory_bytes, rel=1e-4)
        for category, value in full.memory_breakdown.items():
            assert fewer.memory_breakdown[category] == pytest.approx(value, abs=1e-4 * full.peak_memory_bytes)


@pytest.mark.parametrize("plan", [
    ap.Plan(dp=2, zero_stage=1, global_batch_size=4),
    ap.Plan(dp=8, zero_stage=1, global_batch_size=8),  # one micro-batch; the embedding alone is > 1/8 of the states
    ap.Plan(dp=4, tp=2, zero_stage=1, global_batch_size=8),
    ap.Plan(dp=2, zero_stage=3, global_batch_size=4),
    ap.Plan(tp=4, sequence_parallel=True, global_batch_size=2),
    ap.Plan(dp=2, recompute="full", global_batch_size=4),
    ap.Plan(dp=2, recompute="selective", global_batch_size=4),
    ap.Plan(tp=4, sequence_parallel=True, recompute="selective", global_batch_size=2),
    ap.Plan(pp=2, schedule="zero-bubble", global_batch_size=4),
], ids=lambda p: p.describe())
def test_cost_model_holds_to_the_dry_run(plan):
    """Oracle: the dry run. llama3-8b's shapes with 2 blocks: the estimate's tensor memory (reserve excluded)
    of each pipeline stage within 5% of the measured peak (benchmarks/memory_truth.py runs the full grid)."""
    with torch.device("meta"):
        model = ap.models.build_named("llama3-8b", layers=2)
    dry = ap.dryrun(model, plan, stages="all")
    with torch.device("meta"):
        profile = ap.profile_model(ap.models.build_named("llama3-8b", layers=2))
    cluster = ap.Cluster.preset("dgx-h100", gpus=plan.gpus)
    est = ap.estimate(profile, cluster, plan)
    for stage in dry.stages:
        predicted = est.memory_per_stage_bytes[stage.stage] - cluster.memory_reserve_bytes
        assert predicted == pytest.approx(stage.peak_memory_bytes, rel=0.05), stage.stage


@pytest.mark.parametrize("layout", [dict(dp=2), dict(tp=4, sequence_parallel=True)], ids=["dp", "tp-sp"])
def test_selective_recompute_keeps_less_than_none_and_more_than_full(layout):
    """Oracle: what recomputation is for (autoplan.selective keeps the GEMMs' and reductions' outputs, full
    only each block's input): measured activations none > selective > full, on llama3-8b's shapes."""
    with torch.device("meta"):
        model = ap.models.build_named("llama3-8b", layers=2)
    kept = {mode: ap.dryrun(model, ap.Plan(recompute=mode, global_batch_size=2 * layout.get("dp", 1),
                                           **layout)).memory_breakdown["activations"]
            for mode in ("none", "selective", "full")}
    assert kept["none"] > kept["selective"] > kept["full"]


def test_a_large_dry_run_allocates_no_real_memory():
    """Limit case: a rank that would hold tens of GiB (llama3-8b's blocks, tp=1, 2 blocks) leaves the
    process's peak resident size about where it was: every tensor of the run is fake."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.device("meta"):
        model = ap.models.build_named("llama3-8b", layers=2)
    result = ap.dryrun(model, ap.Plan(dp=8, global_batch_size=16))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert result.peak_memory_bytes > 20 * 2**30
    assert grown < 2**30


def test_executor_refusals_stay_refusals():
    """A plan the executor refuses (parameter offload on one replica of a Hugging Face MoE model) is refused by
    the dry run, with the executor's own error."""
    with pytest.raises(InvalidPlanError, match="offload=params runs on FSDP2's CPUOffloadPolicy"):
        ap.dryrun(str(Path(__file__).parent.parent / "hf_configs" / "mixtral.json"),
                  ap.Plan(tp=2, zero_stage=3, offload="params", global_batch_size=4))


def test_zero_bubble_with_selective_recompute_is_refused():
    """torch's selective checkpointing allows one backward through a region; zero-bubble runs two (input and
    weight gradients): refused in one line before any rank runs (it crashed inside the schedule before)."""
    with pytest.raises(InvalidPlanError, match="zero-bubble"):
        ap.dryrun("gpt-tiny", ap.Plan(pp=2, schedule="zero-bubble", recompute="selective", global_batch_size=4))


def test_gpus_must_match_the_plan():
    with pytest.raises(InvalidPlanError, match="--gpus"):
        ap.dryrun("gpt-tiny", ap.Plan(dp=2, global_batch_size=4), gpus=8)


def test_verify_drops_the_plans_that_do_not_fit():
    """Oracle: the dry runs themselves. With GPU memory set between two plans' measured peaks (plus the
    reserve), verify_plans keeps the smaller and drops the larger, in the ranked order."""
    small, large = ap.Plan(dp=2, zero_stage=3, global_batch_size=4), ap.Plan(dp=2, zero_stage=0, global_batch_size=4)
    peaks = [ap.dryrun("gpt-tiny", plan).peak_memory_bytes for plan in (small, large)]
    assert peaks[0] < peaks[1]
    cluster = ap.Cluster.preset("dgx-h100", gpus=2)
    cluster = cluster.model_copy(update={"memory_bytes": cluster.memory_reserve_bytes + sum(peaks) // 2})
    profile = ap.profile_model("gpt-tiny")
    ranked = [(plan, ap.estimate(profile, cluster, plan)) for plan in (large, small)]
    kept, dropped = ap.verify_plans(ranked, "gpt-tiny", cluster)
    assert [plan for plan, _, _ in kept] == [small]
    assert [plan for plan, _, _ in dropped] == [large]
    assert kept[0][2].fits(cluster) and not dropped[0][2].fits(cluster)


def test_verify_drops_plans_the_executor_refuses():
    """A ranked plan the executor does not run (zero-bubble with selective recompute) cannot be verified: it is
    dropped with the executor's reason, and a runnable one is kept."""
    refused = ap.Plan(pp=2, schedule="zero-bubble", recompute="selective", global_batch_size=4)
    runnable = ap.Plan(dp=2, ep=2, zero_stage=3, global_batch_size=4)
    cluster = ap.Cluster.preset("dgx-h100", gpus=2)
    profile = ap.profile_model("deepseek-tiny")
    ranked = [(plan, ap.estimate(profile, cluster, plan)) for plan in (refused, runnable)]
    kept, dropped = ap.verify_plans(ranked, "deepseek-tiny", cluster)
    assert [plan for plan, _, _ in kept] == [runnable]
    assert dropped[0][0] == refused and "zero-bubble" in dropped[0][2]


def test_moe_with_context_parallel_and_zero1_dry_runs():
    """Regression: a MoE plan with cp > 1 and ZeRO-1 (qwen3-235b-a22b's best plan on 64 GPUs has this shape) first
    flattened dp x cp inside the optimizer, under the dry run's fake tensors, where DeviceMesh._flatten fails
    (aten.nonzero). The dry run now completes and the estimate is within 5% of it."""
    plan = ap.Plan(dp=2, tp=2, cp=2, ep=4, zero_stage=1, sequence_parallel=True, global_batch_size=8,
                   micro_batch_size=1)
    dry = ap.dryrun("moe-tiny", plan, gpus=8)
    est = ap.estimate(ap.profile_model("moe-tiny"), ap.Cluster.preset("dgx-h100", gpus=8), plan)
    assert (est.memory_per_gpu_bytes - est.memory_breakdown["reserve"]) == pytest.approx(dry.peak_memory_bytes,
                                                                                         rel=0.05)
