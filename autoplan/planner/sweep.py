"""ap.sweep: how many GPUs? The best plan at each GPU count of a range, and what training on it costs.

Three steps: choose the counts (powers of two, and whole nodes in powers of two, within the range); search
each count with the same global batch (planner.search; a count where nothing fits is a row with the reason);
derive per count the throughput per GPU, the time to train on `tokens` tokens, the GPU-hours and, with a
price per GPU-hour, the cost. Time to train is tokens / (the estimate's tokens/s): it ignores start-up,
checkpointing, evaluation and failures, which at scale add from a few to tens of percent (Dubey et al.
2024, Llama 3, Sec. 3.3.4: 466 interruptions in 54 days, 90% effective training time).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from autoplan.errors import InfeasiblePlanError, InvalidInputError
from autoplan.planner.search import search
from autoplan.planner.space import Constraints
from autoplan.schema import MAX_GPUS, Cluster, Estimate, ModelProfile, Plan, Stack

MAX_COUNTS = 64  # GPU counts one sweep searches (each is a full search)
_TOKEN_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def gpu_counts(*, low: int, high: int, gpus_per_node: int) -> list[int]:
    """The GPU counts a sweep searches, ascending: every power of two in [low, high], and every count of
    whole nodes that is a power of two times the node (which adds counts only when a node's GPUs are not a
    power of two, e.g. 6 or 12 per node)."""
    if not 1 <= low <= high <= MAX_GPUS:
        raise InvalidInputError(f"--gpus range must be LOW-HIGH with 1 <= LOW <= HIGH <= {MAX_GPUS:,}, "
                                f"got {low}-{high}")
    counts = {2**k for k in range(int(math.log2(high)) + 1) if low <= 2**k <= high}
    nodes = 1
    while nodes * gpus_per_node <= high:
        if nodes * gpus_per_node >= low:
            counts.add(nodes * gpus_per_node)
        nodes *= 2
    if not counts:
        raise InvalidInputError(f"--gpus {low}-{high} holds no power of two and no power-of-two number of "
                                f"{gpus_per_node}-GPU nodes")
    return sorted(counts)


def parse_tokens(text: str) -> float:
    """'1T', '300B', '2.5e12', '500M' -> tokens (k, M, B/G, T, P suffixes, powers of 1000)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]{1,2})?)\s*([kKmMbBgGtTpP]?)\s*", text or "")
    if not match:
        raise InvalidInputError(f"--tokens takes a number of tokens such as 1T, 300B or 2.5e12, got {text!r}")
    tokens = float(match.group(1)) * _TOKEN_SUFFIX[match.group(2).lower()]
    if not 1 <= tokens <= 1e18:
        raise InvalidInputError(f"--tokens must be between 1 and 1e18, got {text!r}")
    return tokens


@dataclass
class SweepRow:
    """One GPU count: its best plan and what training on it costs, or why nothing fits."""

    gpus: int
    plan: Plan | None = None
    estimate: Estimate | None = None
    reason: str | None = None            # why no plan fits (or no layout suits), when plan is None

    def tokens_per_s_per_gpu(self) -> float | None:
        return self.estimate.tokens_per_s / self.gpus if self.estimate else None

    def time_to_train_s(self, tokens: float) -> float | None:
        return tokens / self.estimate.tokens_per_s if self.estimate else None

    def gpu_hours(self, tokens: float) -> float | None:
        seconds = self.time_to_train_s(tokens)
        return seconds * self.gpus / 3600 if seconds is not None else None


@dataclass
class SweepResult:
    """What ap.sweep found: one row per GPU count, ascending."""

    rows: list[SweepRow]
    tokens: float
    global_batch_size: int
    gpu_hour_price: float | None = None
    model: str = ""
    cluster: str = ""
    notes: list[str] = field(default_factory=list)

    def cost(self, row: SweepRow) -> float | None:
        hours = row.gpu_hours(self.tokens)
        return hours * self.gpu_hour_price if hours is not None and self.gpu_hour_price is not None else None

    @property
    def fitting(self) -> list[SweepRow]:
        return [row for row in self.rows if row.plan is not None]

    def to_dict(self) -> dict:
        rows = []
        for row in self.rows:
            rows.append({"gpus": row.gpus, "plan": row.plan.model_dump() if row.plan else None,
                         "estimate": row.estimate.model_dump() if row.estimate else None, "reason": row.reason,
                         "tokens_per_s_per_gpu": row.tokens_per_s_per_gpu(),
                         "time_to_train_s": row.time_to_train_s(self.tokens),
                         "gpu_hours": row.gpu_hours(self.tokens), "cost": self.cost(row)})
        return {"model": self.model, "cluster": self.cluster, "tokens": self.tokens,
                "global_batch_size": self.global_batch_size, "gpu_hour_price": self.gpu_hour_price,
                "rows": rows, "notes": self.notes}


def sweep(profile: ModelProfile, cluster: Cluster, *, gpus: tuple[int, int] | list[int], global_batch_size: int,
          tokens: float = 1e12, gpu_hour_price: float | None = None, constraints: Constraints | None = None,
          accept: Callable[[Plan], bool] | None = None, stack: Stack | None = None,
          progress: Callable[[int, int], None] | None = None, runnable_only: bool = True, foreign: bool = False,
          **fixed) -> SweepResult:
    """The best plan of `profile` at each GPU count of `gpus` on `cluster`'s kind of node, all with the same
    `global_batch_size`: a (low, high) range (gpu_counts chooses the counts) or a list of counts.
    `tokens`: the training run's tokens (time to train, GPU-hours); `gpu_hour_price`: price of one GPU-hour
    (the cost column), None for none. `constraints`, `accept`, `stack`, `runnable_only`, `foreign` and `fixed`
    as in ap.search."""
    if isinstance(gpus, tuple):
        counts = gpu_counts(low=gpus[0], high=gpus[1], gpus_per_node=cluster.gpus_per_node)
    else:
        counts = sorted(set(gpus))
    if len(counts) > MAX_COUNTS:
        raise InvalidInputError(f"a sweep searches at most {MAX_COUNTS} GPU counts, got {len(counts)}")
    if not (math.isfinite(tokens) and tokens > 0):
        raise InvalidInputError(f"tokens must be a positive, finite number, got {tokens}")
    if gpu_hour_price is not None and not (math.isfinite(gpu_hour_price) and gpu_hour_price >= 0):
        raise InvalidInputError(f"--gpu-hour-price must be a non-negative, finite number, got {gpu_hour_price}")
    rows = []
    for index, count in enumerate(counts):
        if progress:
            progress(index, len(counts))
        rows.append(_row(profile, cluster.with_gpus(count), global_batch_size, constraints, accept, stack,
                         dict(fixed, runnable_only=runnable_only, foreign=foreign)))
    if progress:
        progress(len(counts), len(counts))
    return SweepResult(rows=rows, tokens=tokens, global_batch_size=global_batch_size, gpu_hour_price=gpu_hour_price,
                       model=profile.name, cluster=cluster.name,
                       notes=["time to train = tokens / predicted tokens/s: no start-up, checkpoints, evaluation "
                              "or failures"])


def _row(profile, cluster, global_batch_size, constraints, accept, stack, fixed) -> SweepRow:
    try:
        found = search(profile, cluster, global_batch_size=global_batch_size, top_k=1, constraints=constraints,
                       accept=accept, stack=stack, **fixed)
    except InfeasiblePlanError as err:
        return SweepRow(gpus=cluster.num_gpus, reason=str(err))
    return SweepRow(gpus=cluster.num_gpus, plan=found.best, estimate=found.best_estimate)
