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


def memory_bound_time_s(*, bytes_moved: float, cluster: Cluster, efficiency: float | None = None) -> float:
    """bytes / (HBM bandwidth · achieved fraction): roofline of a bandwidth-bound kernel (Williams et al. 2009).
    efficiency: a measured fraction for this kind of op (None: the element-wise kernels' memory_bound_efficiency)."""
    return bytes_moved / (cluster.memory_bandwidth_bytes_per_s * (efficiency or cluster.memory_bound_efficiency))


# Memory-bound ops that move data or do one arithmetic op per element (copies, layout changes, indexing, add/mul):
# bandwidth-bound everywhere. The rest (activations, normalisations, softmax, reductions) is bandwidth-bound
# on a GPU too, but a CPU core computes their transcendentals slower than memory streams (gelu and layer_norm
# at ~3.5 GB/s where a copy runs at ~17 GB/s on this project's VM). Names as aten's, without the overload.
STREAMING_OPS = frozenset({
    "copy_", "_to_copy", "clone", "contiguous", "view_copy", "add", "add_", "sub", "sub_", "mul",
    "mul_", "div", "div_", "neg", "cat", "stack", "index", "index_select", "index_copy", "index_copy_", "index_add",
    "index_add_", "index_put", "index_put_", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_",
    "embedding", "embedding_dense_backward", "fill_", "zero_", "zeros", "zeros_like", "ones_like", "full",
    "new_zeros", "where", "masked_fill", "masked_fill_", "repeat", "repeat_interleave", "slice_backward",
    "select_backward", "constant_pad_nd", "roll", "flip", "empty_like"})


def is_streaming_op(op: str) -> bool:
    """Whether an op named as str(aten op) ("aten.mul.Tensor") is a streaming one (STREAMING_OPS)."""
    parts = op.split(".")
    return len(parts) >= 2 and parts[1] in STREAMING_OPS


def streaming_time_s(*, bytes_moved: float, cluster: Cluster) -> float:
    """bytes / (bandwidth · Cluster.streaming_efficiency where measured, else memory_bound_efficiency)."""
    return memory_bound_time_s(bytes_moved=bytes_moved, cluster=cluster, efficiency=cluster.streaming_efficiency)


def optimizer_time_s(*, bytes_moved: float, cluster: Cluster) -> float:
    """bytes / (HBM bandwidth · the optimizer step's achieved fraction, Cluster.optimizer_efficiency where
    measured, else the element-wise kernels' memory_bound_efficiency)."""
    return memory_bound_time_s(bytes_moved=bytes_moved, cluster=cluster, efficiency=cluster.optimizer_efficiency)
