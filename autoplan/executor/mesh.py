"""The DeviceMesh of a plan: axes ("pp", "dp", "cp", "tp"), tp innermost, built once and passed around.

tp innermost keeps a tensor-parallel group on consecutive ranks, i.e. inside a node (torchrun numbers a
node's processes consecutively), which is the layout the cost model assumes (costmodel.comm).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from autoplan.errors import InvalidPlanError
from autoplan.schema import Plan

MESH_AXES = ("pp", "dp", "cp", "tp")
EXPERT_MESH_AXES = ("pp", "edp", "ep", "etp")


def build_mesh(plan: Plan, device_type: str) -> DeviceMesh:
    """A 4-D mesh over all ranks of the initialised process group, shaped by the plan."""
    world = dist.get_world_size()
    if plan.gpus != world:
        raise InvalidPlanError(f"dp*tp*pp*cp = {plan.gpus} but the job has {world} ranks")
    return init_device_mesh(device_type, (plan.pp, plan.dp, plan.cp, plan.tp), mesh_dim_names=MESH_AXES)


def build_expert_mesh(plan: Plan, device_type: str) -> DeviceMesh:
    """The same ranks with each pipeline stage's dp x cp x tp ranks folded into (edp, ep, etp), etp innermost
    (Megatron-Core's MoE parallel folding, expert_tensor_parallel_size): an etp group is etp consecutive
    ranks holding the same experts, each a 1/etp slice of their width; an ep group is ep ranks etp apart
    splitting the experts; an edp group the ranks holding the same expert shards. Every one of the folded
    ranks routes tokens of its own (its dp replica's, its cp chunk's, its tp rank's sequence shard:
    tensor_parallel.moe_layout)."""
    folded = plan.dp * plan.cp * plan.tp
    if folded % (plan.ep * plan.etp):
        raise InvalidPlanError(f"ep*etp = {plan.ep}*{plan.etp} does not divide dp*cp*tp = {folded}")
    mesh = init_device_mesh(device_type, (plan.pp, folded // (plan.ep * plan.etp), plan.ep, plan.etp),
                            mesh_dim_names=EXPERT_MESH_AXES)
    folded_mesh(mesh)  # made now, with real tensors (a dry run's training step runs under fake tensors)
    return mesh


def folded_mesh(expert_mesh: DeviceMesh) -> DeviceMesh:
    """The dp x cp x tp ranks of a pipeline stage as one axis "edp_ep_etp" (the router's and shared experts'
    gradients are summed over them), flattened once and cached by the root mesh."""
    return expert_mesh["edp", "ep", "etp"]._flatten("edp_ep_etp")


def replica_mesh(mesh: DeviceMesh, plan: Plan) -> DeviceMesh:
    """The ranks that hold the same parameters and average their gradients: the dp axis, or with cp > 1
    the dp x cp ranks flattened into one axis "dp_cp" (context parallelism replicates the parameters over
    cp; torchtitan's dp_shard_cp). The flattened mesh is made once and cached by the root mesh."""
    if plan.cp == 1:
        return mesh["dp"]
    return mesh["dp", "cp"]._flatten("dp_cp")


def rank_coordinates(rank: int, plan: Plan) -> dict[str, int]:
    """Where global rank `rank` sits on each axis: rank = ((pp_i*dp + dp_i)*cp + cp_i)*tp + tp_i."""
    coords = {}
    for axis, size in zip(reversed(MESH_AXES), (plan.tp, plan.cp, plan.dp, plan.pp)):
        coords[axis] = rank % size
        rank //= size
    return coords
