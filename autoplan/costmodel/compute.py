"""Compute time: FLOPs over peak x an efficiency that depends on GEMM size; memory-bound ops at HBM speed."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from autoplan.schema import Cluster, EfficiencyPoint

# Flash attention with a causal mask skips the blocks above the diagonal: it runs half of the
# 4·b·s²·h FLOPs that torch.utils.flop_counter (and the Megatron-LM FLOPs formula) count for it
# (Dao 2023, FlashAttention-2, Sec. 3.1.1 "causal masking").
CAUSAL_ATTENTION_WORK_FRACTION = 0.5
# Backward of a GEMM layer is two GEMMs of the forward's size (input grad, weight grad):
# 2x the forward FLOPs (Narayanan et al. 2021, Sec. 5.1). Flash attention's backward runs five
# matmuls against the forward's two: 2.5x (the ratio torch.utils.flop_counter uses for SDPA).
GEMM_BWD_FACTOR = 2.0
ATTENTION_BWD_FACTOR = 2.5
# Elementwise backward reads the saved input and the incoming gradient and writes a gradient:
# about twice the forward's bytes moved (assumption; fused kernels move fewer).
MEMORY_BOUND_BWD_FACTOR = 2.0


def gemm_efficiency(*, flops: float, curve: Sequence[EfficiencyPoint]) -> float:
    """Achieved fraction of peak for a GEMM of `flops` FLOPs: linear interpolation in log10(FLOPs)
    between measured points, clamped at both ends (the shape of cuBLAS efficiency against size in
    NVIDIA's "Matrix Multiplication Background" guide: small GEMMs cannot fill the GPU's SMs)."""
    if flops <= curve[0].flops:
        return curve[0].efficiency
    if flops >= curve[-1].flops:
        return curve[-1].efficiency
    xs = [math.log10(p.flops) for p in curve]
    x = math.log10(flops)
    i = bisect.bisect_right(xs, x)
    lo, hi = curve[i - 1], curve[i]
    frac = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return lo.efficiency + frac * (hi.efficiency - lo.efficiency)


def gemm_time_s(*, flops: float, cluster: Cluster) -> float:
    """flops / (peak · efficiency(flops)): one GEMM on one GPU."""
    if flops <= 0:
        return 0.0
    return flops / (cluster.peak_flops_per_s * gemm_efficiency(flops=flops, curve=cluster.gemm_efficiency))


def attention_core_time_s(*, flops: float, causal_fraction: float, cluster: Cluster) -> float:
    """Fused attention: flops · (fraction actually run under the causal mask) / (peak · attention efficiency)."""
    return flops * causal_fraction / (cluster.peak_flops_per_s * cluster.attention_efficiency)


def memory_bound_time_s(*, bytes_moved: float, cluster: Cluster) -> float:
    """bytes / (HBM bandwidth · achieved fraction): roofline of a bandwidth-bound kernel (Williams et al. 2009)."""
    return bytes_moved / (cluster.memory_bandwidth_bytes_per_s * cluster.memory_bound_efficiency)
