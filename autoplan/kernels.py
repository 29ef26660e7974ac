"""The kernels a GPU training step runs where the CPU runs others, for code that measures a GPU step on the
meta device or with fake tensors (the profiler's trace, the executor's dry run).

- F.scaled_dot_product_attention: on a GPU the flash / memory-efficient kernels, dropout included (they keep
  q, k, v, the output, the log-sum-exp and a random seed, never a seq x seq matrix); on the CPU, with
  dropout the math fallback, which keeps the scores, the probabilities and the dropout mask.
- F.dropout: CUDA's native_dropout keeps a 1-byte mask; the CPU path keeps a mask of the input's dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as a fused kernel (what a GPU runs), traceable on meta."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    out = aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p, is_causal,
                                                       scale=scale)
    return out[0]


def _gpu_dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout as CUDA runs it: native_dropout saves a 1-byte mask (the CPU path saves a float noise)."""
    if not training or p == 0.0:
        return input
    return torch.native_dropout(input, p, True)[0]


@contextlib.contextmanager
def gpu_kernels(flash: bool):
    """Trace with the kernels a GPU training step runs: fused attention (if flash) and native dropout."""
    originals = (F.scaled_dot_product_attention, F.dropout)
    if flash:
        F.scaled_dot_product_attention = _flash_sdpa
    F.dropout = _gpu_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = originals


@contextlib.contextmanager
def gpu_dropout_kernels():
    """Only where dropout is on (p > 0 while training): the GPU's fused attention with dropout and its
    native dropout; everything else runs the kernels it runs on the CPU (what a dry run without dropout
    measures, and 2 CPU ranks reproduce)."""
    sdpa, dropout = F.scaled_dot_product_attention, F.dropout

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        run = _flash_sdpa if dropout_p > 0 else sdpa
        return run(query, key, value, attn_mask, dropout_p, *args, **kwargs)

    def drop(input, p=0.5, training=True, inplace=False):
        if training and p > 0:
            return _gpu_dropout(input, p, training, inplace)
        return dropout(input, p, training, inplace)

    F.scaled_dot_product_attention, F.dropout = attention, drop
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = sdpa, dropout
