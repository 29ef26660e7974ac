"""ap.search: the fastest plans that fit, by branch and bound over the space with an ILP inside.

Four steps:
1. enumerate: every layout (planner.space) x micro-batch x schedule x ZeRO stage is a configuration;
2. bound (planner.bounds): each configuration gets a lower bound on its step time (the pipeline formula with the work
   spread perfectly over the stages and nothing recomputed) and on its memory (the model states spread
   perfectly); configurations whose memory bound exceeds the GPU are pruned;
3. evaluate in order of the time bound: the even partition with each uniform recompute mode, then the
   ILP (planner.partition) where uneven stages or per-stage recompute can still gain; stop as soon as
   the next bound is no better than the k-th best plan found (nothing left can enter the top k);
4. decode: the ranked plans with their estimates, the proven lower bound, and the expert defaults.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from autoplan.costmodel.estimate import Coster
from autoplan.errors import InfeasiblePlanError, InvalidInputError
from autoplan.planner.baselines import expert_defaults
from autoplan.planner.bounds import memory_bound_bytes, time_bound_s, whole_model
from autoplan.planner.partition import solve_partition
from autoplan.planner.space import RECOMPUTE, Constraints, Layout, layouts, micro_batch_sizes, offloads, schedules
from autoplan.schema import MAX_GLOBAL_BATCH, Cluster, Estimate, ModelProfile, Plan, Stack
from autoplan.support import profile_reason

# An evaluated configuration whose best uniform plan is within this fraction of its lower bound is not
# worth an ILP: uneven stages could at most close that gap.
ILP_MIN_GAIN = 1e-3
MAX_TOP_K = 10_000  # ranked plans kept in memory


@dataclass
class SearchResult:
    """What ap.search found. `ranked` holds the top plans that fit, fastest first."""

    ranked: list[tuple[Plan, Estimate]]
    baselines: dict[str, tuple[Plan, Estimate] | None]
    solve_time_s: float
    candidates_considered: int
    candidates_pruned: dict[str, int]
    ilp_solves: int
    lower_bound_s: float                 # no plan of the space is faster than this in the cost model (proven)
    closest_infeasible: tuple[Plan, Estimate] | None = None
    global_batch_size: int = 0
    refusals: dict[str, str] = field(default_factory=dict)  # plan.describe() -> why the executor does not run it

    @property
    def best(self) -> Plan:
        return self.ranked[0][0]

    @property
    def best_estimate(self) -> Estimate:
        return self.ranked[0][1]

    def refusal(self, plan: Plan) -> str | None:
        """Why autoplan's executor does not run `plan` (a ranked plan of `search(..., runnable_only=False)` or
        an expert default), or None if it runs it."""
        return self.refusals.get(plan.describe())

    def to_dict(self) -> dict:
        pair = lambda found: {"plan": found[0].model_dump(), "estimate": found[1].model_dump(),
                              "runnable": self.refusal(found[0]) is None,
                              "refusal": self.refusal(found[0])} if found else None
        return {"best": self.best.model_dump(), "ranked": [pair(found) for found in self.ranked],
                "baselines": {name: pair(found) for name, found in self.baselines.items()},
                "global_batch_size": self.global_batch_size, "solve_time_s": self.solve_time_s,
                "candidates_considered": self.candidates_considered, "candidates_pruned": self.candidates_pruned,
                "ilp_solves": self.ilp_solves, "lower_bound_s": self.lower_bound_s,
                "optimality_gap": self.optimality_gap}

    @property
    def optimality_gap(self) -> float:
        """How much faster than the best plan the cost model's optimum could at most be (fraction):
        best / lower_bound - 1, both in the cost model's (ap.estimate's) step time, over the space searched
        (the Constraints: layouts, micro-batch sizes up to max_micro_batch_size, schedules, virtual stages,
        ZeRO stages, every partition into whole blocks, recompute per stage). 0 means the best plan is the
        cost model's optimum over that space; it says nothing about how close the estimate is to a
        measured step (benchmarks/results/time_truth.md and the bench reports do)."""
        return self.best_estimate.step_time_s / self.lower_bound_s - 1 if self.lower_bound_s > 0 else 0.0


@dataclass(order=True)
class _Config:
    bound_s: float
    plan: Plan = field(compare=False)


def _configs(profile: ModelProfile, cluster: Cluster, coster: Coster, global_batch_size: int,
             constraints: Constraints, pruned: dict[str, int],
             accept: Callable[[Plan], bool] | None = None) -> tuple[list[_Config], _Config | None]:
    """Every configuration with its time bound, and the one with the smallest memory bound (the closest
    to fitting, for the message when nothing fits)."""
    configs, leanest = [], None
    sp = constraints.fixed.get("sequence_parallel", True)  # with tp > 1; --fix sequence_parallel=false turns it off
    for layout in layouts(profile, cluster, global_batch_size=global_batch_size, constraints=constraints):
        per_replica = global_batch_size // layout.dp
        for mbs in micro_batch_sizes(per_replica=per_replica, constraints=constraints):
            base = _plan(layout, mbs, global_batch_size, "1f1b", 1, 0, "none", sp)
            whole = whole_model(coster, base)
            few = per_replica // mbs < layout.pp  # fewer micro-batches than stages: torch runs only GPipe then
            for schedule, v in schedules(pp=layout.pp, num_blocks=profile.num_blocks, constraints=constraints):
                if (schedule == "gpipe") != few and layout.pp > 1:
                    # gpipe: same time as 1f1b in the cost model, more micro-batches in flight
                    pruned["dominated" if not few else "unrunnable"] += len(constraints.zero_stages)
                    continue
                for zero in (z for z in constraints.zero_stages if constraints.allows("zero_stage", z)):
                    for offload in offloads(zero_stage=zero, dp=layout.dp, cp=layout.cp, ep=layout.ep,
                                            etp=layout.etp, cluster=cluster, constraints=constraints):
                        plan = _plan(layout, mbs, global_batch_size, schedule, v, zero, "none", sp, offload)
                        if accept is not None and not accept(plan):
                            pruned["not accepted"] += 1
                            continue
                        memory = memory_bound_bytes(coster, plan, whole)
                        if leanest is None or memory < leanest.bound_s:
                            leanest = _Config(memory, plan)
                        if memory > cluster.memory_bytes:
                            pruned["memory_bound"] += 1
                            continue
                        configs.append(_Config(time_bound_s(coster, plan, whole), plan))
    return configs, leanest


PINNABLE = ("dp", "tp", "pp", "cp", "ep", "etp", "zero_stage", "recompute", "sequence_parallel", "micro_batch_size",
            "schedule", "virtual_stages", "offload")


def _check_fixed(fixed: dict) -> None:
    """Every pinned field is one the search honours, with a value of its type; anything else is refused
    rather than ignored."""
    for name, value in fixed.items():
        if name not in PINNABLE:
            raise InvalidInputError(f"{name} cannot be pinned in a search (pinnable: {', '.join(PINNABLE)}; the "
                                    f"global batch is --global-batch)")
        if name == "sequence_parallel" and not isinstance(value, bool):
            raise InvalidInputError(f"sequence_parallel is pinned to true or false, not {value!r}")


def _plan(layout: Layout, mbs: int, gbs: int, schedule: str, v: int, zero: int, recompute: str,
          sequence_parallel: bool = True, offload: str = "none") -> Plan:
    return Plan(dp=layout.dp, tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=layout.ep, etp=layout.etp, zero_stage=zero,
                recompute=recompute, sequence_parallel=sequence_parallel and layout.tp > 1, micro_batch_size=mbs,
                global_batch_size=gbs, schedule=schedule, virtual_stages=v, offload=offload)


class _TopK:
    """The k fastest distinct plans that fit, and the closest plan that does not."""

    def __init__(self, k: int, limit_bytes: int):
        self.k, self.limit = k, limit_bytes
        self.heap: list[tuple[float, int, Plan, Estimate]] = []   # max-heap on step time via negation
        self.seen: set[str] = set()
        self.closest: tuple[Plan, Estimate] | None = None

    def offer(self, plan: Plan, est: Estimate) -> None:
        if not est.fits:
            if self.closest is None or est.memory_per_gpu_bytes < self.closest[1].memory_per_gpu_bytes:
                self.closest = (plan, est)
            return
        key = plan.model_dump_json()
        if key in self.seen:
            return
        self.seen.add(key)
        heapq.heappush(self.heap, (_rank_key(plan, est), len(self.seen), plan, est))
        if len(self.heap) > self.k:
            heapq.heappop(self.heap)

    @property
    def kth_s(self) -> float:
        return self.heap[0][3].step_time_s if len(self.heap) >= self.k else float("inf")

    def ranked(self) -> list[tuple[Plan, Estimate]]:
        return [(plan, est) for _, _, plan, est in sorted(self.heap, key=lambda item: item[0], reverse=True)]


def _rank_key(plan: Plan, est: Estimate) -> tuple:
    """Max-heap key (negated): faster first; among plans within 1e-6 s, the simpler one (fewer and smaller
    parallel dimensions, no recompute, less sharding), then the one with more memory to spare."""
    simplicity = (plan.offload != "none", plan.offload == "params", plan.cp, plan.pp, plan.virtual_stages, plan.tp,
                  plan.ep, plan.etp, plan.zero_stage,
                  plan.recompute != "none", plan.layers_per_stage is not None, plan.micro_batch_size)
    return (-round(est.step_time_s, 6), tuple(-x for x in simplicity), -est.memory_per_gpu_bytes)


def search(profile: ModelProfile, cluster: Cluster, *, global_batch_size: int, top_k: int = 5,
           constraints: Constraints | None = None, progress: Callable[[int, int], None] | None = None,
           ilp_time_limit_s: float = 5.0, accept: Callable[[Plan], bool] | None = None, stack: Stack | None = None,
           runnable_only: bool = True, foreign: bool = False, **fixed) -> SearchResult:
    """The `top_k` fastest plans of `profile` on `cluster` that fit in GPU memory.

    `accept(plan)` (optional) keeps only the configurations it returns True for, e.g. what an executor runs;
    it is asked once per layout, micro-batch, schedule and ZeRO stage (recompute "none"), then once per
    other recompute mode of the configurations it accepts; a mode it refuses is left out of the partition
    ILP too.

    runnable_only (the default): only plans autoplan's executor runs (autoplan.support; `foreign`: the model is
    a Hugging Face one), on top of `accept`; False ranks every plan and names the executor's refusals
    (SearchResult.refusal), as it does for the expert defaults either way.

    `stack` is the software the plan will run on (autoplan.schema.Stack; None: eager PyTorch, autoplan's executor).
    `fixed` pins plan fields (e.g. tp=8, zero_stage=1). Raises InfeasiblePlanError (with the closest plan
    and its overflow in bytes) when nothing fits.
    """
    start = time.perf_counter()
    if not (1 <= global_batch_size <= MAX_GLOBAL_BATCH and 1 <= top_k <= MAX_TOP_K):
        raise InvalidInputError(f"global_batch_size must be between 1 and {MAX_GLOBAL_BATCH:,} and top_k between 1 "
                                f"and {MAX_TOP_K:,}, got {global_batch_size} and {top_k}")
    constraints = constraints or Constraints()
    _check_fixed(fixed)
    if fixed:
        constraints = Constraints(**{**constraints.__dict__, "fixed": {**constraints.fixed, **fixed}})
    coster = Coster.of(profile, cluster, stack)
    refusal = lambda plan: profile_reason(plan, profile, foreign=foreign)  # noqa: E731
    if runnable_only:
        wanted = accept
        accept = lambda plan: refusal(plan) is None and (wanted is None or wanted(plan))  # noqa: E731
    pruned = {"memory_bound": 0, "time_bound": 0, "dominated": 0, "unrunnable": 0, "not accepted": 0}
    configs, leanest = _configs(profile, cluster, coster, global_batch_size, constraints, pruned, accept)
    configs.sort()
    # every allowed mode: selective trades time for memory with a fused attention too (it drops what the
    # memory-bound ops keep), so it can be the fastest plan that fits
    recompute = tuple(r for r in constraints.recompute if constraints.allows("recompute", r))
    top = _TopK(top_k, cluster.memory_bytes)
    # phase 1: the even partition with each uniform recompute mode, in order of the bound
    uniform: list[tuple[_Config, float]] = []
    for index, config in enumerate(configs):
        if config.bound_s >= top.kth_s:
            pruned["time_bound"] += len(configs) - index
            break
        modes = recompute if accept is None else _accepted_modes(config.plan, recompute, accept)
        uniform.append((config, modes, _evaluate_uniform(coster, config, modes, top)))
        if progress and index % 64 == 0:
            progress(index, len(configs))
    considered = len(uniform)
    # phase 2: the ILP where uneven stages or per-stage recompute could still enter the top k
    bounds = [configs[considered].bound_s] if considered < len(configs) else []
    ilp_solves = 0
    for config, modes, best_uniform in uniform:
        if config.plan.pp == 1:  # one stage: the uniform recompute modes are the whole space
            bounds.append(max(config.bound_s, best_uniform))
            continue
        if config.bound_s >= top.kth_s or best_uniform <= config.bound_s * (1 + ILP_MIN_GAIN) \
                or len(coster.digest.block_templates) != 1:  # blocks of several kinds: partitions stay even
            bounds.append(config.bound_s)
            continue
        ilp_solves += 1
        solved = solve_partition(coster, config.plan, recompute=modes, time_limit_s=ilp_time_limit_s,
                                 cutoff_s=top.kth_s, incumbent_s=best_uniform)
        if solved is None:  # nothing in this configuration fits, or nothing beats the k-th best or its even split
            bounds.append(max(config.bound_s, min(top.kth_s, best_uniform)))
            continue
        top.offer(solved.plan, coster.estimate(solved.plan, check=False))
        bounds.append(max(config.bound_s, solved.bound_s) if solved.optimal else config.bound_s)
    if progress:
        progress(len(configs), len(configs))
    ranked = top.ranked()
    baselines = expert_defaults(coster, global_batch_size)
    shown = [plan for plan, _ in ranked] + [found[0] for found in baselines.values() if found]
    result = SearchResult(
        ranked=ranked, baselines=baselines, refusals={plan.describe(): reason for plan in shown
                                                      if (reason := refusal(plan)) is not None},
        solve_time_s=time.perf_counter() - start, candidates_considered=considered, candidates_pruned=pruned,
        ilp_solves=ilp_solves, lower_bound_s=min(bounds + [ranked[0][1].step_time_s]) if ranked else 0.0,
        closest_infeasible=top.closest, global_batch_size=global_batch_size)
    if not ranked:
        if result.closest_infeasible is None and leanest is not None:  # everything was pruned on memory
            plan = Plan.model_validate({**leanest.plan.model_dump(), "recompute": "full"})
            result.closest_infeasible = (plan, coster.estimate(plan, check=False))
        raise _infeasible(result, profile, cluster)
    return result


def _accepted_modes(plan: Plan, recompute: tuple[str, ...], accept: Callable[[Plan], bool]) -> tuple[str, ...]:
    """The recompute modes `accept` allows for the configuration of `plan` (e.g. an executor that refuses
    zero-bubble with selective recompute)."""
    return tuple(mode for mode in recompute if mode == "none" or accept(plan.model_copy(update={"recompute": mode})))


def _evaluate_uniform(coster: Coster, config: _Config, recompute: tuple[str, ...], top: _TopK) -> float:
    """Estimate the configuration with its even partition and each uniform recompute mode; offer each plan
    to the top k and return the fastest step time that fits (inf if none fits).
    The modes go from the most recomputed to none: where recompute only lowers memory (`recompute_lowers_memory`),
    a mode that does not fit ends the configuration, as none with less recompute would fit either."""
    best = float("inf")
    monotone = recompute_lowers_memory(config.plan)
    for mode in sorted(recompute, key=RECOMPUTE.index, reverse=True):
        plan = config.plan if mode == "none" else Plan.model_validate({**config.plan.model_dump(), "recompute": mode})
        est = coster.estimate(plan, check=False)
        top.offer(plan, est)
        if est.fits:
            best = min(best, est.step_time_s)
        elif monotone:
            break
    return best


def recompute_lowers_memory(plan: Plan) -> bool:
    """Whether more recompute never raises the plan's peak in the memory model: true but for ZeRO-3 in a
    pipeline, where a recomputed stage keeps all its blocks' parameters gathered at the end of a backward
    (costmodel.rank_memory). tests/planner checks it over sampled configurations of several models."""
    return not (plan.zero_stage == 3 and plan.pp > 1)


def _infeasible(result: SearchResult, profile: ModelProfile, cluster: Cluster) -> InfeasiblePlanError:
    gib = 1024**3
    if result.closest_infeasible is None:
        err = InfeasiblePlanError(
            f"no layout dp*tp*pp*cp = {cluster.num_gpus} suits the model ({profile.num_heads} heads, "
            f"{profile.num_kv_heads} key/value heads, {profile.num_blocks} layers, seq_len {profile.seq_len}) "
            f"with global batch {result.global_batch_size} (dp must divide it): try another --global-batch "
            f"or GPU count")
    else:
        plan, est = result.closest_infeasible
        over = est.memory_per_gpu_bytes - cluster.memory_bytes
        err = InfeasiblePlanError(f"no plan fits in {cluster.memory_bytes / gib:.1f} GiB per GPU; closest: "
                                  f"{plan.describe()} needs {est.memory_per_gpu_bytes / gib:.1f} GiB "
                                  f"({over:,} bytes over)")
    err.result = result
    return err
