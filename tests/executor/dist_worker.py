"""Runs plans on real ranks (torch.multiprocessing, gloo, CPU) for the executor's correctness tests."""

import contextlib
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import autoplan as ap
from autoplan.executor import apply, train
from autoplan.models.loader import load_model
from autoplan.schema import Plan

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(model_name: str, **overrides):
    """A built-in name, or a Hugging Face config.json path (tests/hf_configs)."""
    torch.manual_seed(0)
    if model_name.endswith(".json"):
        model = load_model(model_name, device="cpu", **overrides).module
    else:
        model = ap.models.build_named(model_name, **overrides)
    model.init_weights(seed=0)
    return model


def run_plan(model_name: str, plan: Plan, overrides: dict) -> list[float]:
    """Losses of the first STEPS steps; overrides["trainable"] (a regular expression) freezes the parameters
    it does not match (models.finetune), the other overrides build the model."""
    from autoplan.models.finetune import apply_trainable

    overrides = dict(overrides)
    trainable = overrides.pop("trainable", None)
    model = apply_trainable(build(model_name, **overrides), trainable)
    par = apply(model, plan)
    config = model.config
    records = train(par, steps=STEPS, seq_len=config.seq_len, vocab=config.vocab, device=torch.device("cpu"), lr=1e-2,
                    log=None)
    return [r["loss"] for r in records]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """This process as rank `rank` of a `world`-rank gloo group on localhost:`port`, one CPU thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, jobs: list, out):
    with gloo_rank(rank, world, port):
        results = [run_plan(name, Plan.model_validate_json(plan), overrides) for name, plan, overrides in jobs]
        if rank == 0:
            out.put(results)


def run_on_ranks(world: int, jobs: list[tuple[str, Plan, dict]]) -> list[list[float]]:
    """Losses of each job's first steps, run by `world` processes."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    payload = [(name, plan.model_dump_json(), overrides) for name, plan, overrides in jobs]
    mp.start_processes(_worker, args=(world, free_port(), payload, out), nprocs=world, join=True,
                       start_method="spawn")
    return out.get(timeout=10)


SHAPES = [(10,), (6, 4), (3, 5, 7)]  # 10 and 105 elements do not split evenly over 3 ranks


def fake_gradient(shape: tuple[int, ...], step: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(shape, generator=g)


def adamw_steps(make_optimizer, dtype: torch.dtype, steps: int = 4):
    """Parameters of SHAPES (seeded) stepped `steps` times with the same fake gradients by
    make_optimizer(params, lr=, weight_decay=): (params, optimizer)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in SHAPES]
    optimizer = make_optimizer(params, lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = fake_gradient(p.shape, step, i).to(dtype)
        optimizer.step()
    return params, optimizer


def zero_one_steps(dtype: torch.dtype) -> tuple[list[list[float]], list[int]]:
    """ZeroOneAdamW on this rank (adamw_steps): (parameters as lists, elements of optimizer state this rank
    holds per parameter)."""
    from autoplan.executor.zero_one import ZeroOneAdamW

    params, optimizer = adamw_steps(lambda ps, **kw: ZeroOneAdamW(ps, group_of=lambda p: dist.group.WORLD,
                                                                  master_weights=dtype != torch.float32, **kw), dtype)
    return [p.detach().float().tolist() for p in params], [optimizer.state[p]["exp_avg"].numel() for p in params]


def _zero_one_worker(rank: int, world: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {str(dtype): zero_one_steps(dtype) for dtype in (torch.float32, torch.bfloat16)}
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


def run_zero_one(world: int) -> dict[int, dict]:
    """zero_one_steps for fp32 and bf16 parameters on `world` ranks: {rank: {dtype: (params, state sizes)}}."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_zero_one_worker, args=(world, free_port(), out), nprocs=world, join=True,
                       start_method="spawn")
    return dict(out.get(timeout=10) for _ in range(world))
