"""Activation recomputation per transformer block (torch.utils.checkpoint).

full: checkpoint the whole block, keeping only its input (Chen et al. 2016).
selective: keep the outputs of the GEMMs, the fused attention and the collectives, recompute every other op
of the block in backward (autoplan.selective: the memory-bound ops and, with an eager attention, the
seq x seq scores: Korthikanti et al. 2022, Sec. 4.3), through torch's selective-checkpoint policy.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from autoplan.selective import kept_by_selective


def apply_recompute(model: nn.Module, mode: str | list[str], *, stage_of_block=None) -> None:
    """Wrap each block of model.layers for `mode` (or per block: mode[stage_of_block(name)]). Call after
    tensor parallelism (selective recompute finds the row-parallel GEMMs by their sharded weights)."""
    if mode == "none" or not hasattr(model, "layers"):
        return
    for name, block in list(model.layers.items()):
        block_mode = mode if isinstance(mode, str) else mode[stage_of_block(name)]
        if block_mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True)
        elif block_mode == "selective":
            inside = _mark_row_parallel(block)
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True,
                                                    context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                                                 _selective_policy(inside)))


def _mark_row_parallel(block: nn.Module) -> list[bool]:
    """A flag that each Linear of the block sets when it starts: True for a row-parallel one (weight Shard(1)
    over tp). (Set on entry, never reset on exit: backward's recomputation may stop inside a Linear.)"""
    from torch.distributed.tensor import DTensor, Shard

    inside = [False]
    for module in block.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            row = isinstance(weight, DTensor) and weight.placements == (Shard(1),)
            module.register_forward_pre_hook(lambda *_, row=row: inside.__setitem__(0, row))
    return inside


def _selective_policy(inside_row_parallel: list[bool]):
    """torch's selective-checkpoint policy for autoplan.selective's rule: save what it keeps, recompute the rest."""
    def policy(ctx, op, *args, **kwargs):
        keep = kept_by_selective(op, args, row_parallel=inside_row_parallel[0])
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
    return policy
