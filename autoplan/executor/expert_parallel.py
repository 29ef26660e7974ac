"""Expert parallelism for the reference MoE layers and transformers' stacked experts (made to run as
autoplan's MoE does: routed_forward -> run_experts, autoplan.models.hf): experts sharded over the ep ranks, tokens dispatched
to their experts' owners and combined back with all-to-all (GShard, Lepikhin et al. 2020, Sec. 3.2).

The ep group is ep consecutive data-parallel ranks (the cost model's layout: ep folded over the dp
ranks); rank i of a group keeps experts [i·E/ep, (i+1)·E/ep). The model code is not changed: each MoE
module's class is swapped for a subclass whose `run_experts` dispatches, runs its local experts and
combines, with torch's autograd-aware all_to_all_single. Gradients: expert weights are averaged over
the ranks holding the same experts (the expert-data-parallel group), everything else over all dp ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_to_all_single

from autoplan.errors import InvalidPlanError
from autoplan.executor.mesh import folded_mesh
from autoplan.models.hf import RoutedExperts, expert_weight_names, is_stacked_experts, make_routed
from autoplan.support import unsupported_reason
from autoplan.schema import Plan

EXPERT_WEIGHTS = ("w1", "w2", "w3")  # a MoE module's stacked expert weights [E, ...]


class ExpertParallelMixin:
    """run_experts(grouped, counts) over all experts, with only this rank's experts stored."""

    ep_group = None
    ep_size = 1

    def run_experts(self, grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ep, local = self.ep_size, self.num_experts // self.ep_size
        if ep == 1:  # every expert here (ep=1 under tp: only the gradients are folded, `folds_experts`)
            return super().run_experts(grouped, counts)
        send = [sum(counts[r * local:(r + 1) * local]) for r in range(ep)]
        # how many tokens each source rank sends to each of my local experts: [ep, local]
        counts_in = torch.empty(self.num_experts, dtype=torch.long)
        dist.all_to_all_single(counts_in, torch.tensor(counts, dtype=torch.long), group=self.ep_group)
        if is_fake(counts_in):  # a dry run: nothing came back; balanced routing sends each rank what this one sends
            mine = dist.get_rank(self.ep_group)
            per_source = [counts[mine * local:(mine + 1) * local] for _ in range(ep)]
        else:
            per_source = counts_in.view(ep, local).tolist()
        recv = [sum(row) for row in per_source]
        received = all_to_all_single(grouped.new_empty(sum(recv), grouped.shape[1]), grouped, recv, send,
                                     group=self.ep_group)
        # received is source-major (rank, then expert): reorder it expert-major for the local experts
        offsets, start = [], 0
        for row in per_source:
            offsets.append([])
            for count in row:
                offsets[-1].append(start)
                start += count
        order = [i for j in range(local) for r in range(ep)
                 for i in range(offsets[r][j], offsets[r][j] + per_source[r][j])]
        index = torch.tensor(order, dtype=torch.long)
        local_counts = [sum(per_source[r][j] for r in range(ep)) for j in range(local)]
        out = super().run_experts(received[index], local_counts)
        back = torch.empty_like(out).index_copy(0, index, out)  # source-major again
        return all_to_all_single(grouped.new_empty(grouped.shape[0], out.shape[1]), back, send, recv,
                                 group=self.ep_group)


def folds_experts(plan: Plan, *, moe: bool) -> bool:
    """Whether the plan runs a MoE model's expert layers on the folded (edp, ep) mesh: with ep > 1, and with
    tp > 1 at ep=1, where each tp rank routes its own sequence shard through whole experts and the MoE
    layers' gradients (experts, router, shared experts) must be summed over the tp ranks as well."""
    return plan.ep > 1 or (moe and plan.tp > 1)


def _expert_modules(model: nn.Module) -> list[nn.Module]:
    """autoplan's MoE layers, and transformers' stacked experts (made to route through run_experts)."""
    found = []
    for module in model.modules():
        if is_stacked_experts(module):
            make_routed(module)
        if hasattr(module, "num_experts") and hasattr(module, "run_experts"):
            found.append(module)
    return found


def _weight_names(module: nn.Module) -> tuple[str, ...]:
    """The [E, ...] parameters of an expert module: w1, w2, w3 (autoplan's MoE), or transformers' own."""
    known = getattr(module, "expert_weights", None)  # set when sharded (the shapes then say E/ep)
    return known or (expert_weight_names(module) if is_stacked_experts(module) else EXPERT_WEIGHTS)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, plan: Plan) -> None:
    """Shard every MoE layer's experts over `ep_mesh` and route tokens through all-to-all (in place)."""
    if reason := unsupported_reason(plan, moe=True):
        raise InvalidPlanError(reason)
    rank, size = ep_mesh.get_local_rank(), ep_mesh.size()
    for moe in _expert_modules(model):
        if moe.num_experts % size:
            raise InvalidPlanError(f"ep={size} does not divide {moe.num_experts} experts")
        local = moe.num_experts // size
        moe.expert_weights = _weight_names(moe)
        for name in moe.expert_weights:
            setattr(moe, name, nn.Parameter(getattr(moe, name).data[rank * local:(rank + 1) * local].clone()))
        moe.__class__ = type(f"ExpertParallel{type(moe).__name__}", (ExpertParallelMixin, type(moe)), {})
        moe.ep_group, moe.ep_size = ep_mesh.get_group(), size


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the expert weights sharded over the ep ranks (found by module, not marked on the tensors:
    `to_empty` and dtype casts make new parameter objects)."""
    return {id(getattr(m, name)) for m in model.modules() if isinstance(m, ExpertParallelMixin)
            for name in _weight_names(m)}


def moe_layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(MoE layer, its expert-parallel experts module) pairs: autoplan's MoE is both; transformers' sparse-MoE
    block holds its router, shared experts and stacked experts as children."""
    pairs = []
    for module in model.modules():
        if isinstance(module, ExpertParallelMixin) and not isinstance(module, RoutedExperts):
            pairs.append((module, module))
        pairs += [(module, child) for child in module.children()
                  if isinstance(child, ExpertParallelMixin) and isinstance(child, RoutedExperts)]
    return pairs


def routing_parameters(model: nn.Module) -> set[int]:
    """ids of the other parameters of the MoE layers (router, shared experts): whole on every rank, each
    rank's gradient made from its own tokens."""
    experts = expert_parameters(model)
    return {id(p) for layer, _ in moe_layers(model) for p in layer.parameters() if id(p) not in experts}


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad._local_tensor if hasattr(grad, "_local_tensor") else grad


def average_gradients(model: nn.Module, replica_mesh: DeviceMesh, expert_mesh: DeviceMesh, replicas: int) -> None:
    """Average over the `replicas` (dp x cp) ranks that split the batch: the sum over the ranks that made a
    gradient's contributions, divided by dp*cp. Expert weights: over the ranks holding the same experts (edp;
    each one's gradient already gathers its ep group's tokens); the router and shared experts: over every
    folded rank (dp x cp x tp: under tp each rank routes its own sequence shard); the rest (tp-sharded
    DTensors: their local shards) over the replicas."""
    experts, routing = expert_parameters(model), routing_parameters(model)
    edp, folded = expert_mesh["edp"], folded_mesh(expert_mesh)
    for param in model.parameters():
        if param.grad is None:
            continue
        grad = _local(param.grad)
        group = edp if id(param) in experts else folded if id(param) in routing else replica_mesh
        if group.size() > 1:
            dist.all_reduce(grad, group=group.get_group())
        grad.div_(replicas)


def shard_experts(model: nn.Module, expert_mesh: DeviceMesh, *, reshard: bool, replicas: int) -> None:
    """ZeRO 2/3 for the expert-parallel modules, before the blocks are sharded over the replicas: each
    module's expert weights one FSDP2 unit over its edp ranks, its router and shared experts one over the
    folded dp x cp x tp ranks (torchtitan's layout for experts); both reduce by summing and dividing by dp*cp
    (`average_gradients`' arithmetic)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def shard(module: nn.Module, mesh: DeviceMesh) -> None:
        # stacked experts [E/ep, ...] cut by rows only when the rows divide evenly; else by their second dim
        # (FSDP2 pads dim 0 to N·ceil(rows/N): one expert per rank over 16 edp ranks gathered 16 copies)
        placement = lambda p: Shard(1) if p.dim() == 3 and p.shape[0] % mesh.size() else None  # noqa: E731
        unit = fully_shard(module, mesh=mesh, reshard_after_forward=reshard, shard_placement_fn=placement)
        if mesh.size() != replicas:  # a sum then a division (gloo has no pre-multiplied sum; NCCL does)
            unit.set_gradient_divide_factor(replicas)
            unit.set_force_sum_reduction_for_comms(True)

    edp, folded = expert_mesh["edp"], folded_mesh(expert_mesh)
    for layer, experts in moe_layers(model):
        for child in layer.children():
            if child is not experts and any(True for _ in child.parameters()):
                shard(child, folded)
        shard(experts, edp)
