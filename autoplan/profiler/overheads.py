"""Fixed costs fitted to measured times against the cost model's prediction: the per-layer overhead of a
Cluster from measured block times (`autoplan profile`, `fit_layer_overhead`) and Cluster.overheads from
measured runs (`autoplan calibrate`, `fit_overheads`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoplan.errors import InvalidInputError
from autoplan.schema import Cluster


def fit_layer_overhead(cluster: Cluster, rows: Sequence[dict]) -> Cluster:
    """`cluster` with layer_overhead_fwd_s / _bwd_s fitted to measured block times: for each measured block
    and micro-batch size, (measured - predicted by the kernels' work alone) / the block's traced layers; the
    median over the measurements, clamped at 0. Unchanged without layer measurements."""
    import torch

    from autoplan.costmodel.layers import layer_cost
    from autoplan.profiler.model import profile_model
    from autoplan.schema import Plan

    if not rows:
        return cluster
    base = cluster.model_copy(update={"layer_overhead_fwd_s": 0.0, "layer_overhead_bwd_s": 0.0})
    profiles, fwd, bwd = {}, [], []
    for row in rows:
        key = (row["model"], row["seq_len"], row.get("dtype", "bfloat16"))
        if key not in profiles:
            profiles[key] = profile_model(row["model"], seq_len=row["seq_len"], dtype=getattr(torch, key[2]))
        profile = profiles[key]
        block = int(row["layer"].rsplit(".", 1)[-1]) if row["layer"].rsplit(".", 1)[-1].isdigit() else None
        layers = [layer for layer in profile.layers if layer.block == block and block is not None]
        if not layers:
            continue
        plan = Plan(micro_batch_size=row["micro_batch_size"], global_batch_size=row["micro_batch_size"])
        costs = [layer_cost(layer=layer, profile=profile, cluster=base, plan=plan, recompute="none", block_first=False)
                 for layer in layers]
        fwd.append((row["fwd_median_s"] - sum(c.fwd_compute_s for c in costs)) / len(layers))
        bwd.append((row["bwd_median_s"] - sum(c.bwd_compute_s for c in costs)) / len(layers))
    if not fwd:
        return cluster
    how = (f"median over {len(fwd)} measured blocks x micro-batch sizes of (measured - kernel-work prediction) / "
           "layers per block, clamped at 0")
    sources = {**cluster.sources, "layer_overhead_fwd_s": how, "layer_overhead_bwd_s": how}
    return cluster.model_copy(update={"layer_overhead_fwd_s": max(0.0, float(np.median(fwd))),
                                      "layer_overhead_bwd_s": max(0.0, float(np.median(bwd))), "sources": sources})


# ------------------------------------------------------------------------------ feedback from measured runs
def nonnegative_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin ||design x - target|| over x >= 0 (active set: solve, drop the most negative, solve again).
    Enough for the handful of columns of the overhead fit."""
    active = [j for j in range(design.shape[1]) if np.any(design[:, j])]
    while active:
        solution, *_ = np.linalg.lstsq(design[:, active], target, rcond=None)
        if (solution >= 0).all():
            out = np.zeros(design.shape[1])
            out[active] = solution
            return out
        active.pop(int(np.argmin(solution)))
    return np.zeros(design.shape[1])


@dataclass(frozen=True)
class OverheadFit:
    cluster: Cluster
    runs: int
    mape_before: float       # step-time MAPE of the runs without fitted overheads
    mape_after: float        # and with them (in sample)
    unseen: tuple[str, ...]  # features no run exercised (left at 0)


def fit_overheads(cluster: Cluster, runs: Sequence[tuple]) -> OverheadFit:
    """Fit Cluster.overheads (seconds per call of costmodel.overhead.FEATURES) to measured runs, each a
    (ModelProfile, Plan, measured step seconds): non-negative least squares on relative residuals
    (measured - predicted without overheads - sum c_k count_k) / measured, so fast and slow plans weigh alike."""
    from autoplan.costmodel import estimate
    from autoplan.costmodel.overhead import FEATURES, call_counts

    if not runs:
        raise InvalidInputError("no measured runs to fit overheads to (did any plan of the bench run?)")
    for _, plan, seconds in runs:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
            raise InvalidInputError(f"measured step time {seconds!r} of {plan.describe()}: must be a positive, "
                                    "finite number of seconds")
    base = cluster.model_copy(update={"overheads": {}})
    measured = np.array([t for _, _, t in runs], dtype=float)
    predicted = np.array([estimate(profile, base.with_gpus(plan.gpus), plan, check=False).step_time_s
                          for profile, plan, _ in runs])
    counts = np.array([[call_counts(profile, plan)[name] for name in FEATURES] for profile, plan, _ in runs])
    coefficients = nonnegative_least_squares(counts / measured[:, None], 1 - predicted / measured)
    unseen = tuple(name for j, name in enumerate(FEATURES) if not counts[:, j].any())
    fitted = {name: float(c) for name, c in zip(FEATURES, coefficients) if name not in unseen}
    after = predicted + counts @ coefficients
    sources = {**cluster.sources, "overheads": (
        f"non-negative least squares over {len(runs)} measured runs (autoplan calibrate); not exercised by any "
        f"run, left at 0: {', '.join(unseen) or 'none'}")}
    return OverheadFit(cluster.model_copy(update={"overheads": fitted, "sources": sources}), len(runs),
                       float(np.mean(np.abs(predicted - measured) / measured)),
                       float(np.mean(np.abs(after - measured) / measured)), unseen)
