"""The integer program: how many blocks each pipeline rank holds and how it recomputes, under the
per-GPU memory limit, for one fixed layout (dp, tp, pp, cp, ep, ZeRO, micro-batch, schedule).

Stages may be uneven and recomputation may differ between stages: early stages hold more micro-batches
in flight (1F1B: p - s), so they may need to recompute where later ones need not. The objective is the
estimate's own step time (costmodel.pipeline.pipeline_step_s), which is linear in the per-stage times
once the slowest stage is a variable, so the ILP optimum is the estimate's optimum over partitions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from autoplan.costmodel.data_parallel import dp_sync_s, optimizer_step_s
from autoplan.costmodel.estimate import Coster, rank_memory
from autoplan.schema import Plan

TIME_SCALE = 1e7         # ILP time unit: 0.1 microsecond (integer coefficients for CP-SAT)
SOLVER_PARAMETERS: dict = {}
# slack on the incumbent when ruling out block counts: the ILP rounds each of its terms to a tick
INCUMBENT_SLACK = 1e-6


@dataclass(frozen=True)
class PartitionResult:
    plan: Plan
    objective_s: float       # the ILP's step time for the plan (equals the estimate up to rounding)
    bound_s: float           # CP-SAT's proven lower bound on the step time of every partition of the layout
    optimal: bool
    solve_time_s: float
    blocks_per_stage: tuple[range, ...] = ()  # the block counts each pipeline rank was allowed


@dataclass(frozen=True)
class _Option:
    blocks: int
    recompute: str
    step_ticks: int          # forward + backward of one micro-batch on this rank
    fwd_ticks: int
    dp_ticks: int            # exposed data-parallel synchronisation
    optimizer_ticks: int


def block_ranges(*, num_blocks: int, min_blocks: int, max_blocks: list[int]) -> tuple[range, ...]:
    """The block counts each pipeline rank can take in a plan faster than the incumbent: at least
    min_blocks (a block per virtual stage), at most max_blocks[s], and enough that the other ranks, each
    at its maximum, hold the rest: L - sum_{t != s} max_blocks[t]. Empty ranges: no such plan."""
    total = sum(max_blocks)
    return tuple(range(max(min_blocks, num_blocks - (total - hi)), hi + 1) for hi in max_blocks)


def max_blocks_s(*, block_s: float, end_s: float, slowest_limit_s: float, num_blocks: int) -> int:
    """The most blocks a pipeline rank can hold while its forward + backward of one micro-batch, with
    nothing recomputed (recomputation only adds time), k·block_s + end_s, stays within slowest_limit_s."""
    if end_s > slowest_limit_s:
        return -1
    if block_s <= 0 or slowest_limit_s == float("inf"):
        return num_blocks
    return min(num_blocks, math.floor((slowest_limit_s - end_s) / block_s))


def slowest_limit_s(*, incumbent_s: float, p2p_s: float, num_micro_batches: int) -> float:
    """The slowest rank's time per micro-batch, C, in any plan faster than incumbent_s: the step time
    m·C + (sum_i d_i - d_k)/v + D + O + p2p of costmodel.pipeline is at least m·C (each d_i >= 0, and the
    sum holds d_k), so C <= (incumbent - p2p)/m."""
    return (incumbent_s - p2p_s) / num_micro_batches * (1 + INCUMBENT_SLACK) + 10 / TIME_SCALE


def _options(coster: Coster, plan: Plan, stage: int, recompute: tuple[str, ...], blocks: range) -> list[_Option]:
    """Every (blocks, recompute) choice of one stage that fits in GPU memory, with its costs."""
    limit = coster.cluster.memory_bytes
    found = []
    for k in blocks:
        fitting: list[_Option] = []
        for r in recompute:
            rank = coster.rank_cost(plan, stage, {0: k}, r)
            if sum(rank_memory(rank, stage, coster.cluster, plan).values()) > limit:
                continue
            option = _Option(k, r, _ticks(rank.layers.fwd_s + rank.layers.bwd_s), _ticks(rank.layers.fwd_s),
                             _ticks(dp_sync_s(rank, coster.cluster, plan, coster.stack)[0]),
                             _ticks(optimizer_step_s(rank, coster.cluster, plan, coster.stack)))
            if not any(_dominates(kept, option) for kept in fitting):
                fitting.append(option)
        found += fitting
    return found


def _dominates(a: _Option, b: _Option) -> bool:
    """a is never worse than b in any term of the objective (same blocks, same forward)."""
    return (a.fwd_ticks == b.fwd_ticks and a.step_ticks <= b.step_ticks and a.dp_ticks <= b.dp_ticks
            and a.optimizer_ticks <= b.optimizer_ticks)


def _ticks(seconds: float) -> int:
    """Seconds in whole ticks, rounded down: every term of the ILP is at most its true value, so the ILP's
    proven bound is a lower bound of the estimate's step time, not of a rounded copy of it."""
    return math.floor(seconds * TIME_SCALE)


def end_layers_s(coster: Coster, plan: Plan, rank: int) -> float:
    """Forward + backward of one micro-batch through the layers outside the blocks on pipeline rank
    `rank` (the embedding on the first, the head on the last), nothing recomputed."""
    costs = [coster.layers_cost(layers, plan, "none")[0] for layers in coster.end_layers(plan, rank)]
    return sum(cost.fwd_s + cost.bwd_s for cost in costs)


def stage_block_ranges(coster: Coster, plan: Plan, *, incumbent_s: float) -> tuple[range, ...]:
    """Every block count of each pipeline rank that a plan of this layout faster than incumbent_s can
    have (block_ranges with max_blocks_s); every count from v to L - (p-1)·v when incumbent_s is inf."""
    p, v, blocks = plan.pp, plan.chunks_per_rank, coster.profile.num_blocks
    if p == 1:
        return (range(blocks, blocks + 1),)
    block = coster.layers_cost(coster.digest.block_templates[0], plan, "none")[0]
    limit = slowest_limit_s(incumbent_s=incumbent_s, p2p_s=coster.p2p_total_s(plan),
                            num_micro_batches=plan.num_micro_batches)
    highest = [min(blocks - (p - 1) * v,
                   max_blocks_s(block_s=block.fwd_s + block.bwd_s, end_s=end_layers_s(coster, plan, s),
                                slowest_limit_s=limit, num_blocks=blocks)) for s in range(p)]
    return block_ranges(num_blocks=blocks, min_blocks=v, max_blocks=highest)


def solve_partition(coster: Coster, plan: Plan, *, recompute: tuple[str, ...], time_limit_s: float = 5.0,
                    cutoff_s: float = float("inf"), incumbent_s: float = float("inf")) -> PartitionResult | None:
    """Best blocks-per-stage and recompute-per-stage for `plan`'s layout over every partition into whole
    blocks that can beat min(cutoff_s, incumbent_s) (stage_block_ranges: no other partition can; all of
    them when both are inf); None if nothing fits, nothing is faster than `cutoff_s` or `incumbent_s`, or
    the model has blocks of several kinds (the partition then stays even; the caller bounds it otherwise).
    incumbent_s: the step time of a plan of this layout already known (e.g. its even partition)."""
    if len(coster.digest.block_templates) != 1 or plan.pp == 1 and len(recompute) == 1:
        return None
    start = time.perf_counter()
    p, m, v = plan.pp, plan.num_micro_batches, plan.chunks_per_rank
    ranges = stage_block_ranges(coster, plan, incumbent_s=min(cutoff_s, incumbent_s))
    if any(not blocks for blocks in ranges):
        return None
    options = [_options(coster, plan, s, recompute, ranges[s]) for s in range(p)]
    if any(not stage for stage in options):
        return None

    model = cp_model.CpModel()
    # x[s][i] = 1 iff pipeline rank s takes options[s][i] (a block count and a recompute mode)
    x = [[model.new_bool_var(f"x_{s}_{i}") for i in range(len(options[s]))] for s in range(p)]
    for s in range(p):
        model.add_exactly_one(x[s])
    model.add(sum(o.blocks * x[s][i] for s in range(p) for i, o in enumerate(options[s]))
              == coster.profile.num_blocks)
    horizon = max(o.step_ticks for stage in options for o in stage) + 1

    def stage_sum(attr: str, s: int):
        return sum(getattr(o, attr) * x[s][i] for i, o in enumerate(options[s]))

    step = [stage_sum("step_ticks", s) for s in range(p)]
    # slowest: the steady-state time of the slowest rank, C = max_s c_s
    slowest = model.new_int_var(0, horizon, "slowest")
    for s in range(p):
        model.add(slowest >= step[s])
    dp_exposed = model.new_int_var(0, max(o.dp_ticks for st in options for o in st), "dp_exposed")
    optimizer = model.new_int_var(0, max(o.optimizer_ticks for st in options for o in st), "optimizer")
    for s in range(p):
        model.add(dp_exposed >= stage_sum("dp_ticks", s))
        model.add(optimizer >= stage_sum("optimizer_ticks", s))
    # v * (m*C + (sum_i d_i - d_k)/v + D + O): pipeline_step_s without its constant p2p term
    if plan.schedule == "zero-bubble":
        # d_i = f_i / v and d_k is the forward time of the slowest rank k: pick k with y_k
        y = [model.new_bool_var(f"slowest_is_{s}") for s in range(p)]
        model.add_exactly_one(y)
        fwd = [stage_sum("fwd_ticks", s) for s in range(p)]
        fwd_of_slowest = model.new_int_var(0, horizon, "fwd_of_slowest")
        for s in range(p):
            model.add(slowest <= step[s]).only_enforce_if(y[s])
            model.add(fwd_of_slowest <= fwd[s]).only_enforce_if(y[s])
        objective = v * m * slowest + sum(fwd) - fwd_of_slowest
    else:  # d_i = c_i / v and d_k = C
        objective = (v * m - 1) * slowest + sum(step)
    total = objective + v * (dp_exposed + optimizer)
    constant_s = coster.p2p_total_s(plan)
    if cutoff_s < float("inf"):  # only plans that can enter the caller's top k are of interest
        model.add(total <= _ticks(max(cutoff_s - constant_s, 0.0) * v))
    model.minimize(total)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 1
    for key, value in SOLVER_PARAMETERS.items():
        setattr(solver.parameters, key, value)
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    chosen = [options[s][next(i for i in range(len(x[s])) if solver.value(x[s][i]))] for s in range(p)]
    decoded = _decode(plan, chosen, v)
    return PartitionResult(plan=decoded, objective_s=solver.objective_value / v / TIME_SCALE + constant_s,
                           bound_s=solver.best_objective_bound / v / TIME_SCALE + constant_s,
                           optimal=status == cp_model.OPTIMAL,
                           solve_time_s=time.perf_counter() - start, blocks_per_stage=ranges)


def _decode(plan: Plan, chosen: list[_Option], v: int) -> Plan:
    """Blocks per rank -> blocks per chunk (chunk j*pp + s runs on rank s) and recompute per stage."""
    pp = plan.pp
    chunks = [0] * (pp * v)
    for s, option in enumerate(chosen):
        for j in range(v):
            chunks[j * pp + s] = option.blocks // v + (1 if j < option.blocks % v else 0)
    modes = [o.recompute for o in chosen]
    uniform = len(set(modes)) == 1
    even = all(c == chunks[0] for c in chunks)
    return Plan.model_validate({**plan.model_dump(), "layers_per_stage": None if even else chunks,
                                "recompute": modes[0] if uniform else plan.recompute,
                                "recompute_per_stage": None if uniform else modes})
