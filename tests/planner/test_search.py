"""The search: exact on small spaces, never worse than the expert defaults, clear when nothing fits."""

import itertools

import pytest
import torch

import autoplan as ap
from autoplan.planner import Constraints
from autoplan.planner.partition import TIME_SCALE, solve_partition, stage_block_ranges
from autoplan.costmodel.estimate import Coster

SMALL = Constraints(max_cp=2, max_micro_batch_size=2, max_virtual_stages=2)


@pytest.fixture(scope="module")
def small_profile():
    with torch.device("meta"):
        model = ap.models.gpt(layers=4, hidden=512, heads=8, vocab=4096, seq_len=512)
    return ap.profile_model(model)


@pytest.fixture(scope="module")
def tight_cluster(small_profile):
    """4 GPUs, 2 per node, memory set so that about half of the small space fits (checked below)."""
    base = ap.Cluster.preset("dgx-h100", gpus=4).model_copy(update={"gpus_per_node": 2, "memory_reserve_bytes": 0})
    probe = ap.estimate(small_profile, base, ap.Plan(dp=4, global_batch_size=8, micro_batch_size=2))
    return base.model_copy(update={"memory_bytes": int(probe.memory_per_gpu_bytes * 0.8)})


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _exhaustive(profile, cluster, gbs):
    """Oracle: every plan of the small space, enumerated independently of the planner, estimated."""
    gpus, blocks = cluster.num_gpus, profile.num_blocks
    best, fits, total = None, 0, 0
    for tp, cp, pp in itertools.product(_divisors(gpus), repeat=3):
        dp = gpus // (tp * cp * pp) if gpus % (tp * cp * pp) == 0 else 0
        if not dp or tp > 2 or cp > 2 or pp > blocks or gbs % dp or profile.num_heads % tp:
            continue
        for mbs in (b for b in (1, 2) if (gbs // dp) % b == 0):
            schedules = [("1f1b", 1)] if pp == 1 else \
                [("1f1b", 1), ("gpipe", 1), ("zero-bubble", 1)] + ([("interleaved-1f1b", 2)] if 2 * pp <= blocks else [])
            for (schedule, v), zero in itertools.product(schedules, range(4)):
                for ks in itertools.product(range(v, blocks + 1), repeat=pp):
                    if sum(ks) != blocks:
                        continue
                    chunks = [0] * (pp * v)
                    for s, k in enumerate(ks):
                        for j in range(v):
                            chunks[j * pp + s] = k // v + (j < k % v)
                    for modes in itertools.product(("none", "selective", "full"), repeat=pp):
                        plan = ap.Plan(dp=dp, tp=tp, pp=pp, cp=cp, zero_stage=zero, sequence_parallel=tp > 1,
                                       micro_batch_size=mbs, global_batch_size=gbs, schedule=schedule,
                                       virtual_stages=v, layers_per_stage=chunks if pp > 1 else None,
                                       recompute=modes[0], recompute_per_stage=list(modes) if pp > 1 else None)
                        est = ap.estimate(profile, cluster, plan)
                        total += 1
                        if est.fits:
                            fits += 1
                            if best is None or est.step_time_s < best[1].step_time_s:
                                best = (plan, est)
    return best, fits, total


def test_search_equals_exhaustive_optimum(small_profile, tight_cluster):
    """Oracle: exhaustive enumeration of the same space (all layouts, micro-batches, schedules, ZeRO
    stages, partitions and recompute per stage) under the same cost model."""
    (plan, est), fits, total = _exhaustive(small_profile, tight_cluster, gbs=8)
    assert 0 < fits < total  # memory binds: the space has plans that fit and plans that do not
    result = ap.search(small_profile, tight_cluster, global_batch_size=8, top_k=3, constraints=SMALL)
    assert result.best_estimate.step_time_s == pytest.approx(est.step_time_s, rel=1e-6)
    assert result.best_estimate.fits
    assert result.lower_bound_s <= result.best_estimate.step_time_s * (1 + 1e-9)


def test_partition_ilp_equals_brute_force(small_profile, tight_cluster):
    """Oracle: all partitions x recompute per stage of one layout (pp=4, 1f1b and zero-bubble): the ILP's
    objective is the estimate's step time of its plan and no enumerated plan beats it."""
    coster = Coster.of(small_profile, tight_cluster)
    for schedule in ("1f1b", "zero-bubble"):
        base = ap.Plan(pp=4, global_batch_size=8, micro_batch_size=1, schedule=schedule)
        solved = solve_partition(coster, base, recompute=("none", "selective", "full"))
        got = ap.estimate(small_profile, tight_cluster, solved.plan)
        # the ILP counts in whole ticks, each of its m·v + p + 2 terms rounded down (partition._ticks): under the
        # estimate by less than a tick each
        assert got.step_time_s - (8 + 4 + 2) / TIME_SCALE <= solved.objective_s <= got.step_time_s + 1e-12
        for modes in itertools.product(("none", "selective", "full"), repeat=4):
            plan = ap.Plan.model_validate({**base.model_dump(), "recompute_per_stage": list(modes)})
            est = ap.estimate(small_profile, tight_cluster, plan)
            assert not est.fits or est.step_time_s >= got.step_time_s * (1 - 1e-9)


def test_uneven_stages_and_mixed_recompute_when_memory_binds():
    """1F1B's first stage holds p micro-batches, the last one: under a tight limit the ILP recomputes
    early stages only, or gives them fewer blocks (Narayanan et al. 2021; the issue's uneven stages)."""
    profile = ap.profile_model("llama3-8b")
    cluster = ap.Cluster.preset("dgx-h100", gpus=8)
    coster = Coster.of(profile, cluster.model_copy(update={"memory_bytes": 40 * 2**30}))
    base = ap.Plan(pp=8, global_batch_size=64, micro_batch_size=1, schedule="1f1b")
    solved = solve_partition(coster, base, recompute=("none", "full"))
    assert solved.optimal
    plan = solved.plan
    assert plan.layers_per_stage is not None or plan.recompute_per_stage is not None
    est = ap.estimate(profile, coster.cluster, plan)
    assert est.fits


@pytest.mark.parametrize("name, gpus, gbs", [("gpt3-175b", 512, 1536), ("llama3-8b", 64, 512),
                                             ("llama3-70b", 256, 512), ("llama3-405b", 2048, 2048),
                                             ("mixtral-8x7b", 64, 512)])
def test_best_plan_beats_expert_defaults(name, gpus, gbs):
    """Oracle: the expert defaults (pure DP, ZeRO-3/FSDP, Megatron TP8 in node + PP across) under the same
    cost model: the search's best is at least as fast as each that fits, and the result reports them."""
    profile = ap.profile_model(name)
    result = ap.search(profile, ap.Cluster.preset("dgx-h100", gpus=gpus), global_batch_size=gbs, top_k=3)
    assert set(result.baselines) == {"pure DP", "ZeRO-3/FSDP", "Megatron TP+PP"}
    assert any(result.baselines.values())
    for found in result.baselines.values():
        if found:
            assert result.best_estimate.step_time_s <= found[1].step_time_s * (1 + 1e-9)
    assert result.best_estimate.fits
    times = [e.step_time_s for _, e in result.ranked]  # faster first; plans within 1e-6 s rank simpler first
    assert all(a <= b + 1e-6 for a, b in zip(times, times[1:]))


def test_model_larger_than_cluster_names_closest_plan():
    """405B parameters need 16 bytes each of model states: 8 GPUs of 80 GB cannot hold them."""
    with pytest.raises(ap.InfeasiblePlanError, match=r"closest: .* bytes over") as info:
        ap.search(ap.profile_model("llama3-405b"), ap.Cluster.preset("dgx-h100", gpus=8), global_batch_size=64)
    assert info.value.exit_code == 3


def test_fixed_fields_are_respected():
    profile = ap.profile_model("llama3-8b")
    result = ap.search(profile, ap.Cluster.preset("dgx-h100", gpus=16), global_batch_size=64, tp=4, zero_stage=1)
    assert all(p.tp == 4 and p.zero_stage == 1 for p, _ in result.ranked)


def test_pipelines_with_fewer_micro_batches_than_stages_use_gpipe():
    """Oracle: torch.distributed.pipelining runs 1F1B, interleaved and zero-bubble only with at least pp
    micro-batches (the executor refuses the rest); below that only GPipe runs, and above it GPipe is
    dominated (same time, more micro-batches in flight)."""
    profile = ap.profile_model("gpt-tiny")
    cluster = ap.Cluster.preset("dgx-h100", gpus=4)
    result = ap.search(profile, cluster, global_batch_size=4, top_k=500, pp=4)
    piped = [plan for plan, _ in result.ranked]
    assert {plan.num_micro_batches for plan in piped} >= {1, 4}
    for plan in piped:
        assert (plan.schedule == "gpipe") == (plan.num_micro_batches < plan.pp), plan.describe()


def test_selective_recompute_wins_under_memory_limit():
    """The issue's case: llama3-8b (fused attention), tp 8 x dp 8 at ZeRO-1 with 30 GiB per GPU. Oracle:
    the estimates of the same plan with each recompute mode: none does not fit, selective fits and is
    faster than full, so the search must return selective (it once dropped selective for every model
    with fused attention and returned full with a gap of 0.00%)."""
    profile = ap.profile_model("llama3-8b")
    cluster = ap.Cluster.preset("dgx-h100", gpus=64).model_copy(update={"memory_bytes": 30 * 2**30})
    base = ap.Plan(dp=8, tp=8, sequence_parallel=True, zero_stage=1, micro_batch_size=1, global_batch_size=64)
    by_mode = {mode: ap.estimate(profile, cluster, base.model_copy(update={"recompute": mode}))
               for mode in ("none", "selective", "full")}
    assert not by_mode["none"].fits and by_mode["selective"].fits and by_mode["full"].fits
    assert by_mode["selective"].step_time_s < by_mode["full"].step_time_s
    result = ap.search(profile, cluster, global_batch_size=64, top_k=2, tp=8, dp=8, zero_stage=1,
                       micro_batch_size=1)
    assert result.best.recompute == "selective"
    assert result.best_estimate.step_time_s == pytest.approx(by_mode["selective"].step_time_s, rel=1e-9)
    assert result.lower_bound_s <= result.best_estimate.step_time_s * (1 + 1e-9)


@pytest.fixture(scope="module")
def big_head_profile():
    """16 small blocks and a head of many blocks' worth of work (vocabulary 262144 at width 512)."""
    with torch.device("meta"):
        model = ap.models.gpt(layers=16, hidden=512, heads=8, vocab=262144, seq_len=512)
    return ap.profile_model(model)


def test_partition_finds_uneven_optimum_far_from_even(big_head_profile):
    """Oracle: every split of 16 blocks over 2 pipeline ranks, estimated. The head makes the last rank
    slow, so the optimum puts 15 blocks on the first rank: far outside the +/-25% around the even 8
    that the ILP once searched (while it called its bound proven)."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=2)
    base = ap.Plan(pp=2, global_batch_size=8, micro_batch_size=1, schedule="1f1b")
    times = {k: ap.estimate(big_head_profile, cluster, base.model_copy(update={"layers_per_stage": [k, 16 - k]}))
             .step_time_s for k in range(1, 16)}
    best_k = min(times, key=times.get)
    assert abs(best_k - 8) > 0.25 * 8 + 2
    solved = solve_partition(Coster.of(big_head_profile, cluster), base, recompute=("none", "full"),
                             incumbent_s=ap.estimate(big_head_profile, cluster, base).step_time_s)
    assert solved.optimal and solved.plan.layers_per_stage == [best_k, 16 - best_k]
    assert solved.bound_s <= times[best_k] * (1 + 1e-6)


@pytest.mark.parametrize("schedule", ["1f1b", "zero-bubble"])
def test_block_ranges_hold_every_partition_faster_than_the_incumbent(big_head_profile, schedule):
    """Oracle: all 455 splits of 16 blocks over 4 pipeline ranks, estimated: each one faster than the
    even split (the incumbent) has every rank's block count inside the ranges the ILP searches, so
    its optimum over those ranges is the optimum over all splits."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=4)
    coster = Coster.of(big_head_profile, cluster)
    base = ap.Plan(pp=4, global_batch_size=16, micro_batch_size=1, schedule=schedule)
    incumbent = ap.estimate(big_head_profile, cluster, base).step_time_s
    ranges = stage_block_ranges(coster, base, incumbent_s=incumbent)
    assert sum(len(r) for r in ranges) < 4 * 13  # the incumbent rules some counts out
    faster = 0
    for ks in itertools.product(range(1, 14), repeat=4):
        if sum(ks) != 16:
            continue
        est = ap.estimate(big_head_profile, cluster, base.model_copy(update={"layers_per_stage": list(ks)}))
        if est.step_time_s < incumbent:
            faster += 1
            assert all(k in r for k, r in zip(ks, ranges)), (ks, ranges)
    assert faster > 0


def test_accept_is_asked_about_each_recompute_mode():
    """Oracle: autoplan.support, what the executor refuses (zero-bubble with selective recompute): a search
    kept to accepted plans returns none it refuses, though selective is a candidate for every model."""
    from autoplan.support import unsupported_reason

    profile = ap.profile_model("gpt-tiny")
    result = ap.search(profile, ap.Cluster.preset("dgx-h100", gpus=4), global_batch_size=8, top_k=200, pp=2,
                       accept=lambda plan: unsupported_reason(plan, moe=False) is None)
    assert result.ranked
    assert all(unsupported_reason(plan, moe=False) is None for plan, _ in result.ranked)
    assert any(plan.schedule == "zero-bubble" for plan, _ in result.ranked)
    assert any(plan.recompute == "selective" for plan, _ in result.ranked)


def test_search_returns_runnable_plans_by_default_and_labels_the_rest():
    """Oracle: autoplan.support. By default every ranked plan is one the executor runs; runnable_only=False
    also ranks refused ones (zero-bubble with selective recompute) and names the reason, in the result and in the report."""
    from autoplan.report import search_report
    from autoplan.support import profile_reason

    profile = ap.profile_model("deepseek-tiny")
    cluster = ap.Cluster.preset("dgx-h100", gpus=2)
    runnable = ap.search(profile, cluster, global_batch_size=16, top_k=300)
    assert all(profile_reason(plan, profile) is None for plan, _ in runnable.ranked)
    every = ap.search(profile, cluster, global_batch_size=16, top_k=300, runnable_only=False)
    refused = [plan for plan, _ in every.ranked if profile_reason(plan, profile)]
    assert refused and all(every.refusal(plan) == profile_reason(plan, profile) for plan, _ in every.ranked)
    text = search_report(every, profile=profile, cluster=cluster)
    assert f"not runnable by autoplan's executor: {refused[0].describe()}" in text


def test_expert_tensor_parallel_candidates():
    """Oracle: planner.space.expert_tp_degrees' rule, enumerated by hand for mixtral-8x7b (8 experts, width 14336 =
    2^11·7) on 8-GPU nodes: etp is 1 or tp, and every divisor of the width up to a node once ep = 8 splits
    every expert apart; ep*etp must divide the folded ranks; a dense model has only etp = 1; a pinned etp is the
    only candidate wherever it is valid, and the search honours it."""
    from autoplan.planner.space import expert_tp_degrees

    mixtral = ap.profile_model("mixtral-8x7b")
    assert mixtral.expert_ffn_hidden == 14336
    kw = dict(max_etp=8)
    assert expert_tp_degrees(mixtral, folded_ranks=64, tp=1, ep=4, **kw) == [1]
    assert expert_tp_degrees(mixtral, folded_ranks=64, tp=2, ep=4, **kw) == [1, 2]
    assert expert_tp_degrees(mixtral, folded_ranks=64, tp=1, ep=8, **kw) == [1, 2, 4, 8]
    assert expert_tp_degrees(mixtral, folded_ranks=16, tp=1, ep=8, **kw) == [1, 2]
    assert expert_tp_degrees(mixtral, folded_ranks=64, tp=1, ep=4, fixed=2, **kw) == [2]
    assert expert_tp_degrees(mixtral, folded_ranks=64, tp=1, ep=4, fixed=3, **kw) == []  # 14336 % 3
    assert expert_tp_degrees(ap.profile_model("llama3-8b"), folded_ranks=64, tp=8, ep=1, **kw) == [1]
    moe = ap.profile_model("moe-tiny")
    result = ap.search(moe, ap.Cluster.preset("dgx-h100", gpus=4), global_batch_size=8, top_k=5, etp=2)
    assert result.ranked and all(plan.etp == 2 for plan, _ in result.ranked)
    every = ap.search(moe, ap.Cluster.preset("dgx-h100", gpus=4), global_batch_size=8, top_k=400)
    assert {plan.etp for plan, _ in every.ranked} >= {1, 2}


@pytest.mark.parametrize("model, gpus, batch", [("mixtral-8x7b", 64, 256), ("llama3-70b", 256, 512),
                                                ("qwen3-30b-a3b", 32, 256)])
def test_recompute_only_lowers_memory_where_the_search_stops_early(model, gpus, batch):
    """The search stops trying a configuration's recompute modes at the first, from full to none, that does
    not fit, where `recompute_lowers_memory`: over sampled configurations, the peak with more recompute is
    never above the peak with less there."""
    import random

    from autoplan.planner.search import _configs, recompute_lowers_memory

    profile, cluster = ap.profile_model(model), ap.Cluster.preset("dgx-h100", gpus=gpus)
    coster = Coster.of(profile, cluster, None)
    configs, _ = _configs(profile, cluster, coster, batch, Constraints(), {k: 0 for k in (
        "memory_bound", "time_bound", "dominated", "unrunnable", "not accepted")})
    checked = 0
    for config in random.Random(0).sample(configs, min(60, len(configs))):
        if not recompute_lowers_memory(config.plan):
            continue
        peaks = [coster.estimate(config.plan.model_copy(update={"recompute": mode}), check=False).memory_per_gpu_bytes
                 for mode in ("full", "selective", "none")]
        assert peaks == sorted(peaks), config.plan.describe()
        checked += 1
    assert checked >= 20
