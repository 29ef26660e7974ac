"""Data parallelism and ZeRO, mapped onto torch's own implementations.

| ZeRO stage | torch feature                                          | what it shards                       |
|------------|--------------------------------------------------------|--------------------------------------|
| 0          | composable DDP `replicate`                             | nothing (gradients all-reduced)      |
| 1          | DDP + `ZeroRedundancyOptimizer` (tp = 1);              | optimizer states                     |
|            | with tp > 1: FSDP2, reshard_after_forward=False        | optimizer states + gradients (= 2)   |
| 2          | FSDP2 `fully_shard(reshard_after_forward=False)`       | optimizer states + gradients; params |
|            |                                                        | are gathered once per step and kept  |
| 3          | FSDP2 `fully_shard(reshard_after_forward=True)`        | parameters, gradients, optimizer     |

FSDP2 at stage 2 holds the unsharded parameters from the first forward to the end of backward, which is
more than the ZeRO paper's stage 2 (sharded parameters only at rest); the cost model's stage-2 memory
is the paper's. Each block is its own FSDP unit, then the root.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def uses_ddp(*, zero_stage: int, tp: int) -> bool:
    return zero_stage == 0 or (zero_stage == 1 and tp == 1)


def apply_data_parallel(model: nn.Module, dp_mesh: DeviceMesh, *, zero_stage: int, tp: int,
                        pipelined: bool = False) -> nn.Module:
    """Wrap the model for data parallelism over `dp_mesh` (in place; returns the module to train).
    Under a pipeline schedule DDP's hooks see several forwards before their backwards and reduce
    wrong gradients, so there the DDP stages leave the module as is and the caller averages the
    gradients over the dp ranks after the step (`all_reduce_gradients`): DDP's arithmetic, no hooks."""
    if uses_ddp(zero_stage=zero_stage, tp=tp) and pipelined:
        return model
    if uses_ddp(zero_stage=zero_stage, tp=tp):
        from torch.distributed._composable.replicate import replicate

        return replicate(model, device_mesh=dp_mesh)
    reshard = zero_stage == 3
    for block in getattr(model, "layers", {}).values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
    return model


def build_optimizer(model: nn.Module, *, zero_stage: int, tp: int, dp_mesh: DeviceMesh | None,
                    lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; sharded across the dp ranks with ZeroRedundancyOptimizer for ZeRO-1 on plain DDP."""
    params = [p for p in model.parameters() if p.requires_grad]
    if zero_stage == 1 and tp == 1 and dp_mesh is not None and dp_mesh.size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=dp_mesh.get_group(),
                                       lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def all_reduce_gradients(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Average every gradient over the dp ranks (the local shard of a tensor-parallel DTensor)."""
    group, size = dp_mesh.get_group(), dp_mesh.size()
    for param in model.parameters():
        if param.grad is None:
            continue
        grad = param.grad._local_tensor if hasattr(param.grad, "_local_tensor") else param.grad
        torch.distributed.all_reduce(grad, group=group)
        grad.div_(size)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduction on all but the last micro-batch (gradient accumulation) where the
    wrapper offers it (FSDP2); DDP's `replicate` then reduces every micro-batch: same numbers, more traffic."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
