"""Runs plans on real ranks (torch.multiprocessing, gloo, CPU) for the executor's correctness tests."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import autoplan as ap
from autoplan.executor import apply, train
from autoplan.schema import Plan

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(model_name: str, **overrides):
    torch.manual_seed(0)
    model = ap.models.build_named(model_name, **overrides)
    model.init_weights(seed=0)
    return model


def run_plan(model_name: str, plan: Plan, overrides: dict) -> list[float]:
    model = build(model_name, **overrides)
    par = apply(model, plan)
    config = model.config
    records = train(par, steps=STEPS, seq_len=config.seq_len, vocab=config.vocab, device=torch.device("cpu"), lr=1e-2,
                    log=None)
    return [r["loss"] for r in records]


def _worker(rank: int, world: int, port: int, jobs: list, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = [run_plan(name, Plan.model_validate_json(plan), overrides) for name, plan, overrides in jobs]
        if rank == 0:
            out.put(results)
    finally:
        dist.destroy_process_group()


def run_on_ranks(world: int, jobs: list[tuple[str, Plan, dict]]) -> list[list[float]]:
    """Losses of each job's first steps, run by `world` processes."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    payload = [(name, plan.model_dump_json(), overrides) for name, plan, overrides in jobs]
    mp.start_processes(_worker, args=(world, free_port(), payload, out), nprocs=world, join=True,
                       start_method="spawn")
    return out.get(timeout=10)
