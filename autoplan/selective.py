"""What selective recomputation keeps: one rule for the executor, which applies it through torch's
selective-checkpoint policy (executor.recompute), and the profiler, which measures what it keeps
(profiler.trace: selective_bytes) and so what the cost model counts.

Kept (saved from forward to backward): the outputs of the ops that are costly to run again, the GEMMs
(mm, addmm, and batched GEMMs but the square Q K^T), the fused attention kernels (output and log-sum-exp)
and the reductions over ranks (running one again in backward would communicate again). Recomputed in backward from
those: every other op in the block, the memory-bound ones (norms, activations, rotary embeddings, residual
adds, casts) and, with an eager attention, the [b, heads, s, s] scores and what works on them (scale,
mask, softmax, dropout): Korthikanti et al. 2022 (Sec. 4.3) recompute the attention core, the rule here
also recomputes the cheap element-wise ops around the GEMMs, as torchtitan's op-level policy does.

Under tensor parallelism a row-parallel GEMM's output is a partial sum [b, s, h] on every rank that only
its all-reduce (reduce-scatter with SP) reads; keeping it would cost a whole unsharded activation per
row-parallel GEMM, so it is not kept: backward's recomputation runs it again when something after it in
the block is needed (the attention's output projection, to rebuild the residual stream for the MLP) and
not at all for the block's last GEMM (torch stops recomputing once it has what backward needs).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

GEMM_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
FUSED_ATTENTION_OPS = {aten._scaled_dot_product_efficient_attention.default,
                       aten._scaled_dot_product_flash_attention.default,
                       aten._scaled_dot_product_flash_attention_for_cpu.default,
                       aten._scaled_dot_product_cudnn_attention.default}
ATTENTION_BACKWARD_OPS = {aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                          aten._scaled_dot_product_efficient_attention_backward.default,
                          aten._scaled_dot_product_flash_attention_backward.default,
                          aten._scaled_dot_product_cudnn_attention_backward.default}
# ops a view in eager PyTorch though their schema does not say so (reshape's last step, after a copy if one
# was needed, e.g. a Linear's [b*s, n] GEMM output back to [b, s, n]): they move no bytes
NO_TRAFFIC_OPS = {aten._unsafe_view.default}
_BATCHED_GEMMS = {aten.bmm.default, aten.baddbmm.default}
# the collectives whose outputs are kept: a reduction's (all-reduce, reduce-scatter) and an all-to-all's; an
# all-gather runs again in backward, so sequence parallelism keeps the sequence shard of a column-parallel
# GEMM's input, not the gathered whole (Korthikanti et al. 2022, Sec. 4.2.2, do the same)
_KEPT_COLLECTIVES = {"reduce_scatter_tensor", "all_reduce", "all_to_all_single"}


def moves_data(func) -> bool:
    """Whether an op that is not a GEMM or an attention reads and writes its tensors' bytes (not a view)."""
    return not func.is_view and func not in NO_TRAFFIC_OPS


def kept_by_selective(func, args, *, row_parallel: bool = False) -> bool:
    """True if selective recomputation saves the output of `func` called on `args` (decided before the op
    runs, from its inputs: a batched GEMM is Q K^T when its output [.., m, n] is square). row_parallel: the op
    runs inside a tensor-parallel row-parallel Linear, whose GEMM output is a partial sum that only its
    reduction reads: not kept (the reduction's output is)."""
    if row_parallel and func in GEMM_OPS:
        return False
    if func in _BATCHED_GEMMS:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return len(tensors) < 2 or tensors[-2].shape[-2] != tensors[-1].shape[-1]
    if func in GEMM_OPS or func in FUSED_ATTENTION_OPS:
        return True
    return getattr(func, "namespace", "") == "_c10d_functional" and func._opname in _KEPT_COLLECTIVES
