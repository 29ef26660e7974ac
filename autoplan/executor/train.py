"""Apply a plan to a model and train it: the loop behind `autoplan run`.

Order of the appliers (torchtitan's): mesh from the plan -> pipeline split (each rank keeps its chunks)
-> per chunk: tensor/sequence parallel -> recompute (the stage's mode) -> data parallel / ZeRO -> the
pipeline schedule. Context and expert parallelism are not applied by this executor yet and are refused
with a clear error.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autoplan.errors import InvalidPlanError
from autoplan.executor.data import global_batch, replica_micro_batches
from autoplan.executor.data_parallel import (all_reduce_gradients, apply_data_parallel, build_optimizer,
                                             set_gradient_sync, uses_ddp)
from autoplan.executor.expert_parallel import apply_expert_parallel, average_gradients
from autoplan.executor.mesh import build_expert_mesh, build_mesh, rank_coordinates
from autoplan.executor.pipeline import build_schedule, split_model
from autoplan.executor.recompute import apply_recompute
from autoplan.executor.tensor_parallel import apply_tensor_parallel
from autoplan.schema import Plan

UNSUPPORTED = {"cp": "context parallelism"}


@dataclass
class Parallelized:
    model: nn.Module                 # the module to train (a ModuleList of this rank's chunks with pp > 1)
    plan: Plan
    mesh: object | None
    coords: dict = field(default_factory=dict)
    schedule: object | None = None   # the pipeline schedule (pp > 1)
    first: bool = True               # this rank holds the first / last pipeline chunk
    last: bool = True
    expert_mesh: object | None = None  # (pp, edp, ep, cp, tp) when ep > 1


def apply(model: nn.Module, plan: Plan, *, device_type: str = "cpu", tp_plan=None) -> Parallelized:
    """Parallelise `model` in place for `plan` on the initialised process group (or one process)."""
    for axis, what in UNSUPPORTED.items():
        if getattr(plan, axis) > 1:
            raise InvalidPlanError(f"{axis}={getattr(plan, axis)}: {what} is not supported by the executor yet")
    if not dist.is_initialized():
        if plan.gpus != 1:
            raise InvalidPlanError(f"the plan needs {plan.gpus} ranks: run it under torchrun (autoplan launch)")
        apply_recompute(model, plan.recompute)
        return Parallelized(model, plan, None, {"pp": 0, "dp": 0, "cp": 0, "tp": 0})
    mesh = build_mesh(plan, device_type)
    coords = rank_coordinates(dist.get_rank(), plan)
    expert_mesh = build_expert_mesh(plan, device_type) if plan.ep > 1 else None
    if plan.pp == 1:
        return Parallelized(_apply_per_stage(model, plan, mesh, 0, tp_plan, expert_mesh), plan, mesh, coords,
                            expert_mesh=expert_mesh)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    chunks = [(chunk, _apply_per_stage(part, plan, mesh, coords["pp"], tp_plan, expert_mesh))
              for chunk, part in split_model(model, plan, coords["pp"])]
    schedule = build_schedule(plan, chunks, device=device, pp_group=mesh["pp"].get_group())
    indices = [chunk for chunk, _ in chunks]
    return Parallelized(nn.ModuleList([part for _, part in chunks]), plan, mesh, coords, schedule,
                        first=0 in indices, last=plan.pp * plan.virtual_stages - 1 in indices, expert_mesh=expert_mesh)


def _apply_per_stage(model: nn.Module, plan: Plan, mesh, pp_rank: int, tp_plan, expert_mesh=None) -> nn.Module:
    """TP/SP -> EP -> recompute -> DP/ZeRO on one pipeline chunk (or the whole model)."""
    if plan.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=plan.sequence_parallel, user_plan=tp_plan)
    if expert_mesh is not None:  # experts differ per rank: gradients are averaged by hand (average_gradients)
        apply_expert_parallel(model, expert_mesh["ep"], plan)
    apply_recompute(model, plan.stage_recompute(pp_rank))
    if plan.dp > 1 and expert_mesh is None:
        model = apply_data_parallel(model, mesh["dp"], zero_stage=plan.zero_stage, tp=plan.tp, pipelined=plan.pp > 1)
    return model


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: the process's peak RSS


def _max_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _mean_over_dp(value: torch.Tensor, par: Parallelized) -> float:
    if par.mesh is None or par.plan.dp == 1:
        return float(value)
    t = value.detach().to(torch.float64).reshape(1)
    dist.all_reduce(t, group=par.mesh["dp"].get_group())
    return float(t.item()) / par.plan.dp


def train(par: Parallelized, *, steps: int, seq_len: int, vocab: int, device: torch.device, lr: float = 1e-3,
          seed: int = 0, metrics_path: str | None = None, log=print) -> list[dict]:
    """Run `steps` optimizer steps on the synthetic stream; one metrics dict per step (and a summary)."""
    plan, model = par.plan, par.model
    if plan.pp > 1 and plan.num_micro_batches < plan.pp and plan.schedule != "gpipe":
        raise InvalidPlanError(f"{plan.schedule} needs at least pp={plan.pp} micro-batches per replica, "
                               f"got {plan.num_micro_batches}")
    dp_mesh = par.mesh["dp"] if par.mesh is not None else None
    optimizer = build_optimizer(model, zero_stage=plan.zero_stage, tp=plan.tp, dp_mesh=dp_mesh, lr=lr,
                                weight_decay=0.0)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    sink = open(metrics_path, "a") if metrics_path and rank0 else None
    records = []
    try:
        for step in range(steps):
            start = time.perf_counter()
            batch = global_batch(step=step, global_batch_size=plan.global_batch_size, seq_len=seq_len, vocab=vocab,
                                 seed=seed)
            micro = replica_micro_batches(batch, dp=plan.dp, dp_rank=par.coords["dp"],
                                          micro_batch_size=plan.micro_batch_size)
            if par.schedule is not None:
                loss_sum = _pipeline_step(par, torch.cat(micro).to(device))
                if plan.dp > 1 and plan.ep == 1 and uses_ddp(zero_stage=plan.zero_stage, tp=plan.tp):
                    all_reduce_gradients(model, par.mesh["dp"])
            else:
                loss_sum = torch.zeros((), dtype=torch.float64)
                for i, tokens in enumerate(micro):
                    set_gradient_sync(model, i == len(micro) - 1)
                    tokens = tokens.to(device)
                    logits = model(tokens[:, :-1])
                    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / len(micro)
                    loss.backward()
                    loss_sum += loss.detach().to(torch.float64).cpu()
            if par.expert_mesh is not None:
                average_gradients(model, par.mesh["dp"], par.expert_mesh["edp"], plan.dp)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s = _max_over_ranks(time.perf_counter() - start)
            record = {"step": step, "loss": _mean_over_dp(loss_sum, par), "step_time_s": step_s,
                      "tokens_per_s": plan.global_batch_size * seq_len / step_s,
                      "max_memory_bytes": int(_max_over_ranks(_peak_memory_bytes(device)))}
            records.append(record)
            if sink:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            if rank0 and log:
                log(f"step {step:4d}  loss {record['loss']:.4f}  {step_s * 1e3:8.1f} ms  "
                    f"{record['tokens_per_s']:,.0f} tokens/s")
        if records:
            times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
            summary = {"summary": True, "steps": steps, "median_step_time_s": statistics.median(times),
                       "tokens_per_s": plan.global_batch_size * seq_len / statistics.median(times),
                       "max_memory_bytes": max(r["max_memory_bytes"] for r in records),
                       "final_loss": records[-1]["loss"], "plan": plan.model_dump()}
            if sink:
                sink.write(json.dumps(summary) + "\n")
    finally:
        if sink:
            sink.close()
    return records


def _pipeline_step(par: Parallelized, tokens: torch.Tensor) -> torch.Tensor:
    """One schedule step over this replica's micro-batches; the mean loss, known on every pp rank."""
    losses: list[torch.Tensor] = []
    kwargs = {"target": tokens[:, 1:], "losses": losses} if par.last else {}
    if par.first:
        par.schedule.step(tokens[:, :-1], **kwargs)
    else:
        par.schedule.step(**kwargs)
    loss = torch.zeros((), dtype=torch.float64)
    if par.last:
        loss += sum(float(x.detach()) for x in losses) / len(losses)
    dist.all_reduce(loss, group=par.mesh["pp"].get_group())  # only the last stage holds it
    return loss


def init_distributed() -> torch.device:
    """Initialise the process group from torchrun's environment (gloo on CPU, nccl on CUDA)."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
