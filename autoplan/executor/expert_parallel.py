"""Expert parallelism for the reference MoE layers and transformers' stacked experts (made to run as
autoplan's MoE does: routed_forward -> run_experts, autoplan.models.hf_experts): experts sharded over the ep ranks, tokens dispatched
to their experts' owners and combined back with all-to-all (GShard, Lepikhin et al. 2020, Sec. 3.2); and expert
tensor parallelism: each expert's SwiGLU split over etp ranks, w1/w3 by output rows (column-parallel), w2 by input
columns (row-parallel), tokens gathered over the etp ranks before the experts and their partial outputs
reduce-scattered after (Megatron-Core's expert_tensor_parallel_size and its all-to-all token dispatcher: all-to-all
over ep, then all-gather over the expert tp ranks; the reverse after the experts).

The groups are executor.mesh.build_expert_mesh's (edp, ep, etp) folding of a stage's dp x cp x tp ranks;
rank i of an ep group keeps experts [i·E/ep, (i+1)·E/ep), rank j of an etp group their width slice
[j·F/etp, (j+1)·F/etp). The model code is not changed: each MoE module's class is swapped for a subclass whose
`run_experts` dispatches, gathers, runs its local expert shards, reduce-scatters and combines, with torch's
autograd-aware all_to_all_single (which carries the variable-size all-gather and reduce-scatter too: their
backward is the reverse exchange). Gradients: expert weights are averaged over the ranks holding the same
expert shards (the expert-data-parallel group), everything else over all dp ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_to_all_single

from autoplan.errors import InvalidPlanError
from autoplan.executor.data_parallel import all_reduce_in_buckets, even_placement
from autoplan.executor.mesh import folded_mesh
from autoplan.executor.precision import _local
from autoplan.models.hf_experts import RoutedExperts, expert_weight_names, is_stacked_experts, make_routed
from autoplan.support import unsupported_reason
from autoplan.schema import Plan

EXPERT_WEIGHTS = ("w1", "w2", "w3")  # a MoE module's stacked expert weights [E, ...]
WIDTH_DIM = {"w1": 1, "w3": 1, "w2": 2}  # where a reference expert weight holds the expert's width F


def _counts_from_peers(chunks: list[list[int]], group) -> list[list[int]]:
    """What each rank of `group` sends this one, when this one sends chunks[r] (equal lengths) to rank r:
    an all_to_all_single of the counts. In a dry run nothing comes back: balanced routing has every peer
    send what this rank sends itself."""
    got = torch.empty(sum(len(c) for c in chunks), dtype=torch.long)
    dist.all_to_all_single(got, torch.tensor([n for c in chunks for n in c], dtype=torch.long), group=group)
    if is_fake(got):
        return [list(chunks[dist.get_rank(group)]) for _ in chunks]
    return got.view(len(chunks), -1).tolist()


def _expert_major(blocks: list[list[int]], local: int) -> tuple[torch.Tensor, list[int]]:
    """Rows arrive block-major (one block per source, each sorted by local expert, `blocks[b][j]` rows of
    expert j): the index that orders them expert-major, and each local expert's rows."""
    starts, start = [], 0
    for row in blocks:
        starts.append([])
        for count in row:
            starts[-1].append(start)
            start += count
    order = [i for j in range(local) for b, row in enumerate(blocks)
             for i in range(starts[b][j], starts[b][j] + row[j])]
    return torch.tensor(order, dtype=torch.long), [sum(row[j] for row in blocks) for j in range(local)]


class ExpertParallelMixin:
    """run_experts(grouped, counts) over all experts, with only this rank's expert shards stored."""

    ep_group = None
    ep_size = 1
    etp_group = None
    etp_size = 1

    def run_experts(self, grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ep, etp, local = self.ep_size, self.etp_size, self.num_experts // self.ep_size
        if ep == 1 and etp == 1:  # every expert here (ep=1 under tp: only the gradients are folded, `folds_experts`)
            return super().run_experts(grouped, counts)
        # 1. dispatch over ep: rows for experts [r·local, (r+1)·local) go to ep rank r
        send = [sum(counts[r * local:(r + 1) * local]) for r in range(ep)]
        if ep > 1:  # per_source[r][j]: rows ep rank r sends to my local expert j
            per_source = _counts_from_peers([counts[r * local:(r + 1) * local] for r in range(ep)], self.ep_group)
            recv = [sum(row) for row in per_source]
            received = all_to_all_single(grouped.new_empty(sum(recv), grouped.shape[1]), grouped, recv, send,
                                         group=self.ep_group)
        else:
            per_source, received = [list(counts)], grouped
        # 2. gather over etp: every etp rank runs its width slice of the same experts on all their rows
        blocks, gathered = per_source, received
        if etp > 1:
            peers = _counts_from_peers([[c for row in per_source for c in row]] * etp, self.etp_group)
            blocks = [peer[b * local:(b + 1) * local] for peer in peers for b in range(len(per_source))]
            sizes = [sum(peer) for peer in peers]
            gathered = all_to_all_single(received.new_empty(sum(sizes), received.shape[1]),
                                         received.repeat(etp, 1), sizes, [received.shape[0]] * etp,
                                         group=self.etp_group)
        # 3. the local experts on their rows (expert-major), then back to arrival order
        index, local_counts = _expert_major(blocks, local)
        out = super().run_experts(gathered[index], local_counts)
        out = torch.empty_like(out).index_copy(0, index, out)
        # 4. reduce-scatter over etp: each etp rank sums the partial outputs of its own rows
        if etp > 1:
            mine = received.shape[0]
            out = all_to_all_single(out.new_empty(etp * mine, out.shape[1]), out, [mine] * etp, sizes,
                                    group=self.etp_group).view(etp, mine, -1).sum(0)
        # 5. combine over ep: the outputs go back to the ranks that sent the rows
        if ep > 1:
            out = all_to_all_single(grouped.new_empty(grouped.shape[0], out.shape[1]), out, send, recv,
                                    group=self.ep_group)
        return out


def folds_experts(plan: Plan, *, moe: bool) -> bool:
    """Whether the plan runs a MoE model's expert layers on the folded (edp, ep) mesh: with ep > 1, and with
    tp > 1 at ep=1, where each tp rank routes its own sequence shard through whole experts and the MoE
    layers' gradients (experts, router, shared experts) must be summed over the tp ranks as well."""
    return plan.expert_sharded or (moe and plan.tp > 1)


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


def apply_expert_parallel(model: nn.Module, expert_mesh: DeviceMesh, plan: Plan) -> None:
    """Shard every MoE layer's experts over the "ep" axis of `expert_mesh` and their width over its "etp" axis,
    and route tokens through all-to-all (in place)."""
    if reason := unsupported_reason(plan, moe=True, foreign=getattr(model, "is_foreign", False)):
        raise InvalidPlanError(reason)
    ep_mesh, etp_mesh = expert_mesh["ep"], expert_mesh["etp"]
    rank, size = ep_mesh.get_local_rank(), ep_mesh.size()
    etp_rank, etp = etp_mesh.get_local_rank(), etp_mesh.size()
    for moe in _expert_modules(model):
        if moe.num_experts % size:
            raise InvalidPlanError(f"ep={size} does not divide {moe.num_experts} experts")
        local = moe.num_experts // size
        moe.expert_weights = _weight_names(moe)
        for name in moe.expert_weights:
            shard = getattr(moe, name).data[rank * local:(rank + 1) * local]
            if etp > 1:
                shard = _width_slice(moe, name, shard, etp_rank, etp)
            setattr(moe, name, nn.Parameter(shard.clone()))
        moe.__class__ = type(f"ExpertParallel{type(moe).__name__}", (ExpertParallelMixin, type(moe)), {})
        moe.ep_group, moe.ep_size = ep_mesh.get_group(), size
        moe.etp_group, moe.etp_size = etp_mesh.get_group(), etp


def _width_slice(moe: nn.Module, name: str, weight: torch.Tensor, etp_rank: int, etp: int) -> torch.Tensor:
    """Expert tensor parallelism's slice of one stacked weight: rows j·F/etp.. of w1 and w3 (column-parallel),
    columns of w2 (row-parallel)."""
    if name not in WIDTH_DIM:
        raise InvalidPlanError(f"etp={etp} needs autoplan's MoE layout (w1, w2, w3); {type(moe).__name__} has {name}")
    dim = WIDTH_DIM[name]
    width = weight.shape[dim]
    if width % etp:
        raise InvalidPlanError(f"etp={etp} does not divide the experts' width {width}")
    return weight.narrow(dim, etp_rank * width // etp, width // etp)


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


def average_gradients(model: nn.Module, replica_mesh: DeviceMesh, expert_mesh: DeviceMesh, replicas: int) -> None:
    """Average over the `replicas` (dp x cp) ranks that split the batch: the sum over the ranks that made a
    gradient's contributions, divided by dp*cp. Expert weights: over the ranks holding the same expert shards
    (edp; each one's gradient already gathers its ep and etp groups' tokens); the router and shared experts: over every
    folded rank (dp x cp x tp: under tp each rank routes its own sequence shard); the rest (tp-sharded
    DTensors: their local shards) over the replicas."""
    experts, routing = expert_parameters(model), routing_parameters(model)
    edp, folded = expert_mesh["edp"], folded_mesh(expert_mesh)
    by_group: dict[int, tuple[DeviceMesh, list[torch.Tensor]]] = {}
    for param in model.parameters():
        if param.grad is not None:
            group = edp if id(param) in experts else folded if id(param) in routing else replica_mesh
            by_group.setdefault(id(group), (group, []))[1].append(_local(param.grad))
    for group, grads in by_group.values():  # (bucketed: executor.data_parallel.all_reduce_in_buckets)
        all_reduce_in_buckets(grads, group.get_group(), divisor=replicas)


def shard_experts(model: nn.Module, expert_mesh: DeviceMesh, *, reshard: bool, replicas: int) -> None:
    """ZeRO 2/3 for the expert-parallel modules, before the blocks are sharded over the replicas: each
    module's expert weights (their ep and etp shards) one FSDP2 unit over its edp ranks, its router and shared experts one over the
    folded dp x cp x tp ranks (torchtitan's layout for experts); both reduce by summing and dividing by dp*cp
    (`average_gradients`' arithmetic)."""
    from torch.distributed.fsdp import fully_shard

    def shard(module: nn.Module, mesh: DeviceMesh) -> None:
        # stacked experts [E/ep, ...] cut by rows only when the rows divide evenly; else by their second dim
        # (FSDP2 pads dim 0 to N·ceil(rows/N): one expert per rank over 16 edp ranks gathered 16 copies)
        unit = fully_shard(module, mesh=mesh, reshard_after_forward=reshard,
                           shard_placement_fn=even_placement(mesh.size()))
        if mesh.size() != replicas:  # a sum then a division (gloo has no pre-multiplied sum; NCCL does)
            unit.set_gradient_divide_factor(replicas)
            unit.set_force_sum_reduction_for_comms(True)

    edp, folded = expert_mesh["edp"], folded_mesh(expert_mesh)
    for layer, experts in moe_layers(model):
        for child in layer.children():
            if child is not experts and any(True for _ in child.parameters()):
                shard(child, folded)
        shard(experts, edp)
