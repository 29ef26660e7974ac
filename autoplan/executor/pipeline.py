"""Pipeline parallelism with torch.distributed.pipelining: split the model into chunks, schedule them.

Pipeline rank r holds chunks r, r + pp, ..., r + (v-1)·pp of the pp·v chunks (the interleaved layout,
Narayanan et al. 2021, Sec. 2.2.2); chunk c holds plan.layers_per_stage[c] consecutive blocks (or the even
split the cost model assumes), the first chunk also the embedding, the last the final norm and output.
A chunk is the model with the other blocks deleted, so names (layers.<i>) and checkpoints stay the same.

| plan schedule     | torch schedule                  |
|-------------------|---------------------------------|
| gpipe             | ScheduleGPipe                   |
| 1f1b              | Schedule1F1B                    |
| interleaved-1f1b  | ScheduleInterleaved1F1B (v > 1) |
| zero-bubble       | ScheduleInterleavedZeroBubble   |
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)

from autoplan.costmodel.estimate import even_split
from autoplan.errors import InvalidPlanError
from autoplan.schema import Plan

_SINGLE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
_MULTI = {"interleaved-1f1b": ScheduleInterleaved1F1B, "zero-bubble": ScheduleInterleavedZeroBubble}


def chunk_bounds(plan: Plan, num_blocks: int) -> list[tuple[int, int]]:
    """[start, end) block range of each of the pp·v chunks."""
    counts = plan.layers_per_stage or even_split(num_blocks, plan.pp * plan.virtual_stages)
    if sum(counts) != num_blocks:
        raise InvalidPlanError(f"layers_per_stage sums to {sum(counts)} but the model has {num_blocks} layers")
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def split_model(model: nn.Module, plan: Plan, pp_rank: int) -> list[tuple[int, nn.Module]]:
    """(chunk index, module) of each chunk pipeline rank `pp_rank` holds."""
    if not (isinstance(getattr(model, "layers", None), nn.ModuleDict) and
            all(hasattr(model, part) for part in ("embed", "norm", "output"))):
        raise InvalidPlanError("pp > 1 needs a model laid out as embed -> layers -> norm -> output "
                               "(autoplan's reference models, Hugging Face configs)")
    names = list(model.layers.keys())
    bounds = chunk_bounds(plan, len(names))
    last = len(bounds) - 1
    chunks = []
    for chunk in range(pp_rank, len(bounds), plan.pp):
        start, end = bounds[chunk]
        part = copy.deepcopy(model)
        for name in names[:start] + names[end:]:
            del part.layers[name]
        if chunk != 0:
            part.embed = None
        if chunk != last:
            part.norm, part.output = None, None
        chunks.append((chunk, part))
    return chunks


def tied_across_stages(model: nn.Module, chunks: list[tuple[int, nn.Module]], mesh) -> tuple[list, object]:
    """The parameters of this rank's chunks that the whole model ties to a parameter another stage holds (a
    tied embedding and head: first and last stage each keep a copy), and the process group of the first and
    last pipeline rank with this rank's dp, cp, tp coordinates, whose sum of their gradients each copy then
    takes (Megatron-LM's embedding group, Narayanan et al. 2021). `model` is the whole model before the split,
    `chunks` after the per-stage appliers."""
    import torch.distributed as dist

    from autoplan.executor.derived_tp import tied_groups

    names = [name for group in tied_groups(model) for name in group]
    if not names:
        return [], None
    group = None
    ranks = mesh.mesh  # [pp, dp, cp, tp]
    for first, last in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()):
        made = dist.new_group([first, last])  # every rank creates every group, in the same order
        if dist.get_rank() in (first, last):
            group = made
    params = []
    for _, part in chunks:
        for name in names:
            try:
                param = part.get_parameter(name)
            except AttributeError:  # the module is not in this chunk (None)
                continue
            if all(param is not p for p in params):
                params.append(param)
    return params, group


def sum_tied_gradients(params: list, group) -> None:
    """Each stage's copy of a tied parameter gets the gradient summed over the stages (so copies stay equal)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    for param in params:
        if param.grad is not None:
            grad = param.grad
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_schedule(plan: Plan, stages: list[tuple[int, nn.Module]], *, device: torch.device, pp_group):
    """The torch schedule running this rank's chunks over `plan.num_micro_batches` micro-batches."""
    total = plan.pp * plan.virtual_stages
    pipeline_stages = [PipelineStage(module, chunk, total, device, group=pp_group) for chunk, module in stages]
    m = plan.num_micro_batches
    if plan.schedule in _SINGLE and plan.virtual_stages == 1:
        return _SINGLE[plan.schedule](pipeline_stages[0], n_microbatches=m, loss_fn=cross_entropy)
    return _MULTI[plan.schedule](pipeline_stages, n_microbatches=m, loss_fn=cross_entropy)
