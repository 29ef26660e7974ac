"""ZeRO stage 1 (Rajbhandari et al. 2020, P_os): AdamW whose states are split evenly over the data-parallel
ranks that hold the same parameters.

Each parameter's local storage (the whole tensor, or this rank's DTensor shard under tensor parallelism) is
seen flat and cut into N = group size chunks of ceil(numel / N) elements; rank r keeps the fp32 master
weights (with low-precision parameters) and both moments of chunk r only, 12 bytes per parameter / N, the
paper's division. A step, after the gradients have been averaged over the group (DDP, or by hand):

1. each rank updates its chunk of every parameter from its chunk of the (full) gradient;
2. the updated chunks are all-gathered back into every rank's parameter: tensors smaller than a bucket
   (GATHER_BUCKET_ELEMENTS, at most the group's largest tensor) go together, one all-gather per bucket, as
   Megatron-LM's distributed optimizer gathers its buckets; a larger tensor gathers alone, in place. The
   gathers run inside the optimizer step (not overlapped with the next forward: costmodel.data_parallel
   prices them so for the "torch" stack).

This replaces torch's ZeroRedundancyOptimizer, which hands whole tensors to ranks: with dp = 64 on
llama3-8b its rank 0 kept the 525M-element embedding's states, 4x the even share (the dry run measured it;
benchmarks/results/memory_truth.md). The arithmetic is torch.optim.AdamW's (executor.precision.adamw_update).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from autoplan.costmodel.memory import ZERO1_GATHER_BUCKET_ELEMENTS as GATHER_BUCKET_ELEMENTS
from autoplan.executor.precision import HOST, MasterWeightAdamW, _local, adamw_update, local_grad

# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ZeroOneAdamW(MasterWeightAdamW):
    """AdamW with its states sharded over a process group per parameter (`group_of(param)`).

    state[p]: step (python int), exp_avg, exp_avg_sq and, when `master_weights`, master (fp32, the length
    of this rank's chunk of p's local storage). Ignores amsgrad and gradient scaling.
    """

    def __init__(self, params, *, group_of: Callable[[torch.Tensor], dist.ProcessGroup], master_weights: bool,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, offload: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, offload=offload)
        self.master_weights = master_weights or offload  # offloaded: the host keeps the master
        self._groups = {id(p): group_of(p) for group in self.param_groups for p in group["params"]}
        self._chunks = {id(p): _chunk(_local(p).numel(), self._groups[id(p)])
                        for group in self.param_groups for p in group["params"]}

    def chunk(self, param: torch.Tensor) -> tuple[int, int, int]:
        """(start, stop, chunk length) of this rank's part of `param`'s flat local storage."""
        return self._chunks[id(param)]

    def _update(self, param: torch.Tensor, group: dict) -> None:
        start, stop, _ = self.chunk(param)
        state = self._state_of(param)
        state["step"] += 1
        weight, grad = _local(param).view(-1)[start:stop], local_grad(param).reshape(-1)[start:stop]
        adamw_update(weight, grad, state.get("master"), state["exp_avg"], state["exp_avg_sq"], step=state["step"],
                     group=group)

    def _state_of(self, param: torch.Tensor) -> dict:
        """param's state, made on first use: step 0, fp32 zeros for the moments, the master from the weights."""
        state = self.state[param]
        if not state:
            start, stop, _ = self.chunk(param)
            weight = _local(param).view(-1)[start:stop]
            state["step"] = 0
            device = HOST if self.offloaded else weight.device
            if self.master_weights:
                state["master"] = weight.to(device, torch.float32, copy=True)
            state["exp_avg"] = torch.zeros(stop - start, dtype=torch.float32, device=device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        return state

    def rank_state_dict(self, names: dict[int, str]) -> dict:
        """This rank's states and hyperparameters under keys of its own (`rank<global rank>.state.<name>.<key>`,
        `names`: id(param) -> name): each rank's chunks differ, so a checkpoint keeps them apart and a
        resume with the same plan and ranks reads each back. Makes the states of parameters not yet stepped."""
        prefix, out = f"rank{dist.get_rank()}.", {}
        for i, group in enumerate(self.param_groups):
            out.update({f"{prefix}param_groups.{i}.{key}": value for key, value in group.items() if key != "params"})
            for param in group["params"]:
                for key, value in self._state_of(param).items():
                    out[f"{prefix}state.{names[id(param)]}.{key}"] = value
        return out

    def load_rank_state_dict(self, state: dict, names: dict[int, str]) -> None:
        """Take back what `rank_state_dict` gave (tensors loaded in place or replaced, other values replaced)."""
        prefix = f"rank{dist.get_rank()}."
        for i, group in enumerate(self.param_groups):
            for key in [k for k in group if k != "params"]:
                group[key] = state[f"{prefix}param_groups.{i}.{key}"]
            for param in group["params"]:
                mine = self._state_of(param)
                for key, value in mine.items():
                    new = state[f"{prefix}state.{names[id(param)]}.{key}"]
                    if isinstance(value, torch.Tensor):
                        if new is not value:
                            value.copy_(new)
                    else:
                        mine[key] = new

    @torch.no_grad()
    def step(self, closure=None):
        """Update this rank's chunk of every parameter, then gather every rank's chunks, bucket by bucket."""
        self._updated: list[torch.Tensor] = []
        loss = super().step(closure)
        for process_group, params in self._by_group(self._updated):
            for bucket in _buckets(params, [self.chunk(p)[2] for p in params], size=dist.get_world_size(process_group)):
                self._gather(bucket, process_group)
        self._updated = []
        return loss

    def _after_update(self, param: torch.Tensor) -> None:
        self._updated.append(param)

    def _by_group(self, params: list[torch.Tensor]) -> list[tuple[dist.ProcessGroup, list[torch.Tensor]]]:
        """params by (process group of 2+ ranks, dtype, device), in order."""
        groups: dict[tuple, tuple[dist.ProcessGroup, list[torch.Tensor]]] = {}
        for param in params:
            process_group, local = self._groups[id(param)], _local(param)
            if dist.get_world_size(process_group) > 1:
                key = (id(process_group), local.dtype, local.device)
                groups.setdefault(key, (process_group, []))[1].append(param)
        return list(groups.values())

    def _gather(self, bucket: list[torch.Tensor], process_group: dist.ProcessGroup) -> None:
        """Every rank's updated chunks of `bucket`'s tensors into every rank's copies: one all-gather."""
        size = dist.get_world_size(process_group)
        flats = [_local(p).view(-1) for p in bucket]
        chunks = [self.chunk(p) for p in bucket]
        if len(bucket) == 1 and flats[0].numel() == size * chunks[0][2]:  # one tensor cut evenly: in place
            start, stop, length = chunks[0]
            _all_gather(flats[0], flats[0][start:stop].clone(), group=process_group)
            return
        total = sum(length for _, _, length in chunks)
        piece = flats[0].new_zeros(total)
        offset = 0
        for flat, (start, stop, length) in zip(flats, chunks):
            piece[offset:offset + stop - start] = flat[start:stop]
            offset += length
        whole = flats[0].new_empty(size * total)
        _all_gather(whole, piece, group=process_group)
        rows, offset = whole.view(size, total), 0
        for flat, (_, _, length) in zip(flats, chunks):
            flat.copy_(rows[:, offset:offset + length].reshape(-1)[:flat.numel()])
            offset += length


def _buckets(params: list[torch.Tensor], lengths: list[int], *, size: int) -> list[list[torch.Tensor]]:
    """Buckets of params whose gathered chunks (size x chunk length) fill at most min(GATHER_BUCKET_ELEMENTS,
    the largest tensor's) elements: a tensor that large makes a bucket alone; the smaller ones, largest first,
    go into the first bucket with room (first-fit decreasing: close to their total over the capacity, which is
    how costmodel.gathers.param_gathers counts them)."""
    capacity = min(GATHER_BUCKET_ELEMENTS, max(size * length for length in lengths))
    buckets: list[list[torch.Tensor]] = []
    small: list[tuple[int, int, torch.Tensor]] = []
    for index, (param, length) in enumerate(zip(params, lengths)):
        if size * length >= capacity:
            buckets.append([param])
        else:
            small.append((size * length, index, param))
    filled: list[int] = []  # elements in each bucket of small tensors
    packed: list[list[tuple[int, torch.Tensor]]] = []
    for elements, index, param in sorted(small, key=lambda item: (-item[0], item[1])):
        slot = next((i for i, used in enumerate(filled) if used + elements <= capacity), None)
        if slot is None:
            filled.append(0)
            packed.append([])
            slot = len(filled) - 1
        filled[slot] += elements
        packed[slot].append((index, param))
    return buckets + [[param for _, param in sorted(bucket, key=lambda item: item[0])] for bucket in packed]


def _chunk(numel: int, group: dist.ProcessGroup) -> tuple[int, int, int]:
    """(start, stop, length) of this rank's chunk of `numel` elements cut in ceil(numel / size) over `group`."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    length = -(-numel // size)
    start = min(rank * length, numel)
    return start, min(start + length, numel), length
