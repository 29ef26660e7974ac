"""ZeRO stage 1 (Rajbhandari et al. 2020, P_os): AdamW whose states are split evenly over the data-parallel
ranks that hold the same parameters.

Each parameter's local storage (the whole tensor, or this rank's DTensor shard under tensor parallelism) is
seen flat and cut into N = group size chunks of ceil(numel / N) elements; rank r keeps the fp32 master
weights (with low-precision parameters) and both moments of chunk r only, 12 bytes per parameter / N, the
paper's division. A step, after the gradients have been averaged over the group (DDP, or by hand):

1. each rank updates its chunk of every parameter from its chunk of the (full) gradient;
2. the updated chunks are all-gathered back into every rank's parameter (one all-gather per tensor).

This replaces torch's ZeroRedundancyOptimizer, which hands whole tensors to ranks: with dp = 64 on
llama3-8b its rank 0 kept the 525M-element embedding's states, 4x the even share (the dry run measured it;
benchmarks/results/memory_truth.md). The arithmetic is torch.optim.AdamW's (executor.precision.adamw_update).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

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

    def _after_update(self, param: torch.Tensor) -> None:
        """Every rank's updated chunk into every rank's copy of `param` (the replicas step the same parameters)."""
        process_group = self._groups[id(param)]
        size = dist.get_world_size(process_group)
        if size == 1:
            return
        start, stop, length = self.chunk(param)
        flat = _local(param).view(-1)
        piece = flat.new_zeros(length)
        piece[:stop - start] = flat[start:stop]
        if flat.numel() == size * length:
            _all_gather(flat, piece, group=process_group)
        else:  # the last chunks are short: gather into a padded buffer
            whole = flat.new_empty(size * length)
            _all_gather(whole, piece, group=process_group)
            flat.copy_(whole[:flat.numel()])


def _chunk(numel: int, group: dist.ProcessGroup) -> tuple[int, int, int]:
    """(start, stop, length) of this rank's chunk of `numel` elements cut in ceil(numel / size) over `group`."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    length = -(-numel // size)
    start = min(rank * length, numel)
    return start, min(start + length, numel), length
