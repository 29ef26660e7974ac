"""Activation recomputation per transformer block (torch.utils.checkpoint).

full: checkpoint the whole block, keeping only its input (Chen et al. 2016).
selective: keep everything but the seq x seq attention scores, which are recomputed (Korthikanti et al.
2022, Sec. 4.3), through torch's selective-checkpoint policy: an op whose output is square in its last
two dims (scores, softmax, dropout mask) is recomputed, every other op's output saved. With a fused
attention kernel there are no such outputs and selective equals none, as the cost model assumes.
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


_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}


def _square_output_policy():
    """Recompute ops that produce (or work on) seq x seq tensors; save every other op's output.
    A policy decides before the op runs, so the output shape is inferred: a GEMM's is (m, n), an
    elementwise op's that of its first input."""
    def policy(ctx, op, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if op in _GEMMS and len(tensors) >= 2:
            rows, cols = tensors[-2].shape[-2], tensors[-1].shape[-1]
        elif tensors and tensors[0].dim() >= 2:
            rows, cols = tensors[0].shape[-2], tensors[0].shape[-1]
        else:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE if rows == cols > 1 else CheckpointPolicy.MUST_SAVE
    return policy
