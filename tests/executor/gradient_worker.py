"""Gradients of one training step on real ranks (gloo, CPU) against the single process's, for the expert tests.

Each rank runs executor.train_step on batch 0 with an "optimizer" that records the gradients it would apply
(after every averaging the plan does), runs the same step unparallelised on a second copy of the model, and
compares each of its parameters' gradients with the single-process one: whole for replicated tensors, the
full tensor of tensor-parallel DTensors, and for expert weights the rank's slice (experts [r·E/ep, ...) of its
ep rank, width [j·F/etp, ...) of its etp rank: executor.expert_parallel)."""

import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from autoplan.executor import apply
from autoplan.executor.expert_parallel import WIDTH_DIM, expert_parameters
from autoplan.executor.train import Parallelized, train_step
from autoplan.schema import Plan
from dist_worker import build, free_port, gloo_rank


class GradientRecorder:
    """Stands in for the optimizer: step() keeps a copy of every gradient, zero_grad() drops them."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.grads = model, {}

    def step(self) -> None:
        self.grads = {name: _whole(p.grad) for name, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


def _whole(grad: torch.Tensor) -> torch.Tensor:
    return (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()


def step_gradients(par, *, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    recorder = GradientRecorder(par.model)
    train_step(par, recorder, 0, seq_len=seq_len, vocab=vocab, device=torch.device("cpu"))
    return recorder.grads


def _expert_slice(name: str, ref: torch.Tensor, local: torch.Tensor, ep_rank: int, etp_rank: int) -> torch.Tensor:
    rows = local.shape[0]
    ref = ref[ep_rank * rows:(ep_rank + 1) * rows]
    dim = WIDTH_DIM[name.rsplit(".", 1)[-1]]
    width = local.shape[dim]
    return ref.narrow(dim, etp_rank * width, width)


def gradient_errors(model_name: str, plan: Plan) -> dict[str, float]:
    """{parameter: max |distributed - single process| / max |single process|} on this rank."""
    model = build(model_name)
    par = apply(model, plan)
    config = model.config
    got = step_gradients(par, seq_len=config.seq_len, vocab=config.vocab)
    single = Plan(global_batch_size=plan.global_batch_size, micro_batch_size=plan.micro_batch_size)
    reference = build(model_name)
    want = step_gradients(Parallelized(reference, single, None, {"pp": 0, "dp": 0, "cp": 0, "tp": 0}),
                          seq_len=config.seq_len, vocab=config.vocab)
    experts = {name for name, p in par.model.named_parameters() if id(p) in expert_parameters(par.model)}
    ep_rank = par.expert_mesh["ep"].get_local_rank() if par.expert_mesh is not None else 0
    etp_rank = par.expert_mesh["etp"].get_local_rank() if par.expert_mesh is not None else 0
    errors = {}
    for name, ref in want.items():
        mine = got[name]
        if name in experts:
            ref = _expert_slice(name, ref, mine, ep_rank, etp_rank)
        errors[name] = float((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return errors


def _worker(rank: int, world: int, port: int, jobs: list, out):
    with gloo_rank(rank, world, port):
        out.put((rank, [gradient_errors(name, Plan.model_validate_json(plan)) for name, plan in jobs]))


def gradient_errors_on_ranks(world: int, jobs: list[tuple[str, Plan]]) -> list[dict[str, float]]:
    """For each job, the worst relative gradient error of each parameter over the `world` ranks."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    payload = [(name, plan.model_dump_json()) for name, plan in jobs]
    mp.start_processes(_worker, args=(world, free_port(), payload, out), nprocs=world, join=True,
                       start_method="spawn")
    per_rank = [out.get(timeout=10)[1] for _ in range(world)]
    return [{name: max(rank[i][name] for rank in per_rank) for name in per_rank[0][i]} for i in range(len(jobs))]
