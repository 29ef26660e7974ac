"""A simulated 2-node job on one machine: torchrun's multi-node launch (--nnodes 2, static rendezvous),
the mesh keeps each tp group inside a node and spans the nodes with dp, as the cost model assumes."""

import json
import subprocess
import sys
from pathlib import Path

from autoplan.schema import Plan
from dist_worker import free_port

SCRIPT = Path(__file__).with_name("mesh_layout_script.py")


def test_tp_stays_inside_a_node(tmp_path):
    """Oracle: the rank layout rank = node·(GPUs per node) + local rank of torchrun, and the mesh's
    rank = ((pp_i·dp + dp_i)·cp + cp_i)·tp + tp_i: tp=2 groups are {0,1} and {2,3}, one per node."""
    plan = Plan(dp=2, tp=2, global_batch_size=4)
    out, port = tmp_path / "layout.json", free_port()
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
              "--master-addr=127.0.0.1", f"--master-port={port}"]
    procs = [subprocess.Popen([*common, f"--node-rank={node}", str(SCRIPT), plan.model_dump_json(), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
    rows = json.loads(out.read_text())
    assert [r["node"] for r in rows] == [0, 0, 1, 1]
    for row in rows:
        assert row["tp_nodes"] == [row["node"]] * 2      # the tp group is inside the node
        assert sorted(row["dp_nodes"]) == [0, 1]         # the dp group spans the two nodes
