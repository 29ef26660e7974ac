"""How well predictions kept their promise: error, rank agreement and regret of a benchmark's plans."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error |predicted - measured| / measured, as a fraction (0.1 = 10%)."""
    pairs = _pairs(predicted, measured)
    if any(m <= 0 for _, m in pairs):
        raise ValueError("measured values must be positive")
    return sum(abs(p - m) / m for p, m in pairs) / len(pairs)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span (the convention of Spearman's rho)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties averaged). NaN when either
    side is constant, or for fewer than 2 points."""
    pairs = _pairs(predicted, measured)
    if len(pairs) < 2:
        return math.nan
    x, y = ranks([p for p, _ in pairs]), ranks([m for _, m in pairs])
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def regret(picked_throughput: float, measured_throughputs: Sequence[float]) -> float:
    """Measured throughput of the picked plan divided by the best measured one (1.0: it was the fastest)."""
    best = max(measured_throughputs)
    if best <= 0:
        raise ValueError("no positive measured throughput")
    return picked_throughput / best


def _pairs(predicted: Sequence[float], measured: Sequence[float]) -> list[tuple[float, float]]:
    if len(predicted) != len(measured):
        raise ValueError(f"{len(predicted)} predictions but {len(measured)} measurements")
    if not predicted:
        raise ValueError("no points")
    return list(zip(predicted, measured))
