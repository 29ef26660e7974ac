"""Run by test_multinode_layout under two torchrun instances: is every tp group inside one node?"""

import json
import os
import sys

import torch
import torch.distributed as dist

from autoplan.executor.mesh import build_mesh
from autoplan.schema import Plan

dist.init_process_group("gloo")
plan = Plan.model_validate_json(sys.argv[1])
mesh = build_mesh(plan, "cpu")
node = int(os.environ["GROUP_RANK"])  # torchrun's node rank
tp_nodes = [None] * plan.tp
dist.all_gather_object(tp_nodes, node, group=mesh["tp"].get_group())
dp_nodes = [None] * plan.dp
dist.all_gather_object(dp_nodes, node, group=mesh["dp"].get_group())
rows = [None] * dist.get_world_size()
dist.all_gather_object(rows, {"rank": dist.get_rank(), "node": node, "tp_nodes": tp_nodes, "dp_nodes": dp_nodes})
if dist.get_rank() == 0:
    with open(sys.argv[2], "w") as out:
        json.dump(rows, out)
dist.destroy_process_group()
