"""Activation recomputation per transformer block (torch.utils.checkpoint).

full: checkpoint the whole block, keeping only its input (Chen et al. 2016).
selective: keep everything but the seq x seq attention scores, which are recomputed (Korthikanti et al.
2022, Sec. 4.3), through torch's selective-checkpoint policy: an op that makes or works on the scores
(Q K^T, scale, mask, softmax, dropout) is recomputed, every other op's output saved. torch's policy saves
an op's output whether or not autograd needs it, so this keeps more than no recompute outside the scores
(the dry run measures it; the profiler counts it as selective_bytes); with a fused attention kernel there
are no scores to recompute.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def apply_recompute(model: nn.Module, mode: str | list[str], *, stage_of_block=None) -> None:
    """Wrap each block of model.layers for `mode` (or per block: mode[stage_of_block(name)])."""
    if mode == "none" or not hasattr(model, "layers"):
        return
    for name, block in list(model.layers.items()):
        block_mode = mode if isinstance(mode, str) else mode[stage_of_block(name)]
        if block_mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True)
        elif block_mode == "selective":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True,
                                                    context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                                                 _square_output_policy()))


_BATCHED_GEMMS = {torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}


def _square_output_policy():
    """Recompute the ops that make or work on the attention scores [b, heads, s, s]: a batched GEMM whose
    output is square (Q K^T) and any op on a 4-D input square in its last two dims (scale, mask, softmax,
    dropout); save every other op's output. A policy decides before the op runs, so the output shape is
    inferred from the inputs. (Only 4-D inputs and batched GEMMs: a [b, s, h] activation or a [b*s, n] GEMM
    is square whenever s = h or b*s = n, llama3-70b's 8192 x 8192 at seq_len 8192 among them.)"""
    def policy(ctx, op, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if op in _BATCHED_GEMMS and len(tensors) >= 2:
            rows, cols = tensors[-2].shape[-2], tensors[-1].shape[-1]
        elif tensors and tensors[0].dim() >= 4:
            rows, cols = tensors[0].shape[-2], tensors[0].shape[-1]
        else:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE if rows == cols > 1 else CheckpointPolicy.MUST_SAVE
    return policy
