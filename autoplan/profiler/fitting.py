"""The fits behind a measured Cluster (profiler.calibrate): the GEMM efficiency curve, isotonic in FLOPs,
and a link's alpha-beta, least squares over measured collectives under the ring model costmodel.comm prices
them with. Plain functions over the measurement dicts (no torch), tested on synthetic data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoplan.errors import InvalidInputError
from autoplan.schema import EfficiencyPoint, Link

GEMM_CURVE_POINTS = 8
MIN_EFFICIENCY = 1e-6


# ----------------------------------------------------------------------------------------- GEMM curve
def isotonic_increasing(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool-adjacent-violators; Barlow et al. 1972)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (v2, w2, c2), (v1, w1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [mean for mean, _, count in blocks for _ in range(int(count))]


def fit_gemm_curve(points: Sequence[dict], *, peak_flops_per_s: float | None = None,
                   max_points: int = GEMM_CURVE_POINTS) -> list[EfficiencyPoint]:
    """Efficiency = achieved / peak against GEMM FLOPs, made non-decreasing in FLOPs by an isotonic fit
    (GEMMs of equal FLOPs, e.g. tensor-parallel shapes, are averaged first), sampled at up to `max_points`
    FLOPs spaced evenly in log FLOPs, clipped to (0, 1]. Peak: the declared one, else the best achieved
    rate (efficiency relative to this machine's best GEMM). Ignores shape beyond FLOPs, as the cost model
    does (it interpolates in log FLOPs)."""
    if not points:
        raise InvalidInputError("no GEMM measurements to fit an efficiency curve to")
    peak = peak_flops_per_s or max(p["achieved_flops_per_s"] for p in points)
    by_flops: dict[float, list[float]] = {}
    for p in points:
        by_flops.setdefault(float(p["flops"]), []).append(p["achieved_flops_per_s"] / peak)
    flops = sorted(by_flops)
    fitted = isotonic_increasing([float(np.mean(by_flops[f])) for f in flops], [len(by_flops[f]) for f in flops])
    keep = sorted({int(np.argmin(np.abs(np.log(flops) - math.log(target))))
                   for target in np.geomspace(flops[0], flops[-1], min(max_points, len(flops)))})
    return [EfficiencyPoint(flops=flops[i], efficiency=min(1.0, max(MIN_EFFICIENCY, fitted[i]))) for i in keep]


# ----------------------------------------------------------------------------------------- links
def ring_model(op: str, group_size: int) -> tuple[int, float]:
    """(latency steps, fraction of M each rank sends) of the algorithm costmodel.comm prices `op` with:
    all_reduce 2(n-1) steps, 2(n-1)/n·M (ring reduce-scatter + all-gather); all_gather, reduce_scatter
    n-1 steps, (n-1)/n·M (ring); all_to_all n-1 steps, (n-1)/n·M (pairwise exchange); p2p 1 step, M
    (Thakur, Rabenseifner & Gropp 2005). The fractions are NCCL's busbw/algbw factors (nccl-tests
    doc/PERFORMANCE.md), so the fitted bandwidth is NCCL's bus bandwidth."""
    n = group_size
    if op == "all_reduce":
        return 2 * (n - 1), 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return n - 1, (n - 1) / n
    if op == "p2p":
        return 1, 1.0
    raise ValueError(f"no ring model for {op!r}")


@dataclass(frozen=True)
class LinkFit:
    link: Link
    points: int
    max_relative_error: float
    notes: tuple[str, ...] = ()


def fit_link(points: Sequence[dict]) -> Link:
    """Alpha-beta link fitted to measured collectives; see `fit_link_detailed`."""
    return fit_link_detailed(points).link


def fit_link_detailed(points: Sequence[dict]) -> LinkFit:
    """Least squares for (α, B) in t_i = steps_i·α + traffic_i·M_i / B over measured (op, group_size,
    bytes M_i, median_s t_i), with steps and traffic from `ring_model` (the same formulas costmodel.comm
    prices collectives with, so a fitted link reproduces the measurements there). Each residual is
    relative (divided by t_i), so small messages (latency) and large ones (bandwidth) weigh alike.
    Emulated entries (gloo's reduce_scatter as all_reduce) are left out. Clamps: α < 0 -> 0 and B refitted
    through the origin; B <= 0 -> the largest message's traffic / time. Each clamp is named in `notes`."""
    rows = [p for p in points if not p.get("emulated") and p.get("group_size", 0) >= 2]
    if not rows:
        raise InvalidInputError("no collective measurements to fit a link to")
    model = [ring_model(p["op"], p["group_size"]) for p in rows]
    steps = np.array([s for s, _ in model], dtype=float)
    traffic_bytes = np.array([f * p["bytes"] for (_, f), p in zip(model, rows)], dtype=float)
    time_s = np.array([p["median_s"] for p in rows], dtype=float)
    design = np.stack([steps, traffic_bytes], axis=1) / time_s[:, None]  # relative residuals: rows / t_i
    (latency_s, s_per_byte), *_ = np.linalg.lstsq(design, np.ones(len(rows)), rcond=None)
    notes = []
    if latency_s < 0:
        notes.append(f"fitted latency {latency_s:.3g} s < 0: clamped to 0, bandwidth refitted")
        latency_s, ratio = 0.0, traffic_bytes / time_s
        s_per_byte = ratio.sum() / (ratio ** 2).sum()
    if s_per_byte <= 0:
        largest = int(np.argmax(traffic_bytes))
        s_per_byte = time_s[largest] / traffic_bytes[largest]
        notes.append("fitted bandwidth <= 0 (latency-bound sizes only?): used the largest message's traffic/time")
    predicted_s = steps * latency_s + traffic_bytes * s_per_byte
    error = float(np.max(np.abs(predicted_s - time_s) / time_s))
    return LinkFit(Link(bandwidth_bytes_per_s=float(1 / s_per_byte), latency_s=float(latency_s)), len(rows),
                   error, tuple(notes))

