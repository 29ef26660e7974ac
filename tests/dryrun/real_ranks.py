"""Runs plans on real CPU ranks (gloo, real tensors) under the same memory tracker as the dry run."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autoplan.executor.dryrun_rank import prepare, track_steps
from autoplan.models import llama
from autoplan.schema import Plan, StageMemory

SMALL_LLAMA = dict(layers=2, hidden=128, heads=4, kv_heads=2, ffn_hidden=384, vocab=1024, seq_len=256)


def build_small_llama() -> torch.nn.Module:
    with torch.device("meta"):
        return llama(**SMALL_LLAMA)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, plans: list[str], out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for plan_json in plans:
            par, optimizer = prepare(build_small_llama(), Plan.model_validate_json(plan_json))
            memory = track_steps(par, optimizer, steps=2, seq_len=SMALL_LLAMA["seq_len"], vocab=SMALL_LLAMA["vocab"])
            gathered = [None] * world
            dist.all_gather_object(gathered, memory.model_dump_json())
            results.append(gathered)
            dist.barrier()
        if rank == 0:
            out.put(results)
    finally:
        dist.destroy_process_group()


def measure_real(plans: list[Plan]) -> list[list[StageMemory]]:
    """For each plan (all of the same size), every rank's memory over two real training steps of SMALL_LLAMA."""
    world = plans[0].gpus
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_worker, args=(world, _free_port(), [p.model_dump_json() for p in plans], out), nprocs=world,
                       join=True, start_method="spawn")
    return [[StageMemory.model_validate_json(r) for r in ranks] for ranks in out.get(timeout=10)]
