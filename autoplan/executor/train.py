"""Apply a plan to a model and train it: the loop behind `autoplan run`.

Order of the appliers (torchtitan's): mesh from the plan -> pipeline split (each rank keeps its chunks)
-> per chunk: tensor/sequence parallel -> recompute (the stage's mode) -> data parallel / ZeRO -> the
pipeline schedule. Context parallelism (executor.context_parallel) shards each micro-batch's sequence over
the cp ranks inside the step and averages gradients over dp x cp. Checkpoints: executor.checkpoint.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autoplan.errors import InvalidPlanError
from autoplan.executor.checkpoint import KEEP_LAST, latest_checkpoint, load_checkpoint, save_checkpoint, stray_entries
from autoplan.executor.checkpoint_files import FolderLock, on_rank0
from autoplan.executor.context_parallel import ContextParallel, check_context_parallel, sequence_shard
from autoplan.executor.data import global_batch, replica_micro_batches
from autoplan.executor.data_parallel import (all_reduce_gradients, apply_data_parallel, averages_by_hand,
                                             build_optimizer, set_gradient_sync, uses_ddp)
from autoplan.executor.expert_parallel import (apply_expert_parallel, average_gradients, folds_experts,
                                               shard_experts)
from autoplan.executor.mesh import build_expert_mesh, build_mesh, rank_coordinates, replica_mesh
from autoplan.executor.pipeline import build_schedule, split_model, sum_tied_gradients, tied_across_stages
from autoplan.executor.recompute import apply_recompute
from autoplan.models.titan import refuse_torchtitan
from autoplan.support import unsupported_reason
from autoplan.executor.tensor_parallel import apply_tensor_parallel
from autoplan.schema import Plan


@dataclass
class Parallelized:
    model: nn.Module                 # the module to train (a ModuleList of this rank's chunks with pp > 1)
    plan: Plan
    mesh: object | None
    coords: dict = field(default_factory=dict)
    schedule: object | None = None   # the pipeline schedule (pp > 1)
    first: bool = True               # this rank holds the first / last pipeline chunk
    last: bool = True
    expert_mesh: object | None = None  # (pp, edp, ep, etp) when ep or etp > 1, or a MoE model with tp > 1 (folds_experts)
    cp: ContextParallel | None = None  # shards micro-batches over the cp ranks when cp > 1
    tied: list = field(default_factory=list)  # this rank's copies of parameters tied across pipeline stages
    tied_group: object | None = None            # the first and last pipeline rank: their gradients are summed


def apply(model: nn.Module, plan: Plan, *, device_type: str = "cpu", tp_plan=None) -> Parallelized:
    """Parallelise `model` in place for `plan` on the initialised process group (or one process)."""
    refuse_torchtitan(model)
    moe = any(hasattr(m, "num_experts") for m in model.modules())
    reason = unsupported_reason(plan, moe=moe, foreign=getattr(model, "is_foreign", False))
    if reason:
        raise InvalidPlanError(reason)
    if plan.cp > 1:
        check_context_parallel(model, plan)
    if not dist.is_initialized():
        if plan.gpus != 1:
            raise InvalidPlanError(f"the plan needs {plan.gpus} ranks: run it under torchrun (autoplan launch)")
        apply_recompute(model, plan.recompute)
        return Parallelized(model, plan, None, {"pp": 0, "dp": 0, "cp": 0, "tp": 0})
    mesh = build_mesh(plan, device_type)
    if plan.cp > 1:  # flatten dp x cp now: DeviceMesh._flatten cannot run later under a dry run's fake tensors
        replica_mesh(mesh, plan)
    coords = rank_coordinates(dist.get_rank(), plan)
    expert_mesh = build_expert_mesh(plan, device_type) if folds_experts(plan, moe=moe) else None
    if plan.pp == 1:
        cp = ContextParallel(model, mesh["cp"], device_type) if plan.cp > 1 else None
        return Parallelized(_apply_per_stage(model, plan, mesh, 0, tp_plan, expert_mesh), plan, mesh, coords,
                            expert_mesh=expert_mesh, cp=cp)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    chunks = [(chunk, _apply_per_stage(part, plan, mesh, coords["pp"], tp_plan, expert_mesh))
              for chunk, part in split_model(model, plan, coords["pp"])]
    tied, tied_group = tied_across_stages(model, chunks, mesh)
    schedule = build_schedule(plan, chunks, device=device, pp_group=mesh["pp"].get_group())
    indices = [chunk for chunk, _ in chunks]
    parts = nn.ModuleList([part for _, part in chunks])
    cp = ContextParallel(parts, mesh["cp"], device_type) if plan.cp > 1 else None
    return Parallelized(parts, plan, mesh, coords, schedule, first=0 in indices,
                        last=plan.pp * plan.virtual_stages - 1 in indices, expert_mesh=expert_mesh, cp=cp,
                        tied=tied, tied_group=tied_group)


def _apply_per_stage(model: nn.Module, plan: Plan, mesh, pp_rank: int, tp_plan, expert_mesh=None) -> nn.Module:
    """TP/SP -> EP -> recompute -> DP/ZeRO on one pipeline chunk (or the whole model)."""
    if plan.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=plan.sequence_parallel, user_plan=tp_plan)
    if expert_mesh is not None:  # experts differ per rank: ZeRO 0/1 average gradients by hand (average_gradients)
        apply_expert_parallel(model, expert_mesh, plan)
    apply_recompute(model, plan.stage_recompute(pp_rank))
    if _fsdp_experts(plan, expert_mesh):  # ZeRO 2/3: experts over edp first
        shard_experts(model, expert_mesh, reshard=plan.zero_stage == 3, replicas=plan.dp * plan.cp)
    if plan.dp * plan.cp > 1 and (expert_mesh is None or _fsdp_experts(plan, expert_mesh)):  # replicated over dp, cp
        model = apply_data_parallel(model, replica_mesh(mesh, plan), zero_stage=plan.zero_stage, tp=plan.tp,
                                    pipelined=plan.pp > 1, offload=plan.offload)
    return model


def _fsdp_experts(plan: Plan, expert_mesh) -> bool:
    """Expert layers as FSDP2 units (ZeRO 2/3 over more than one replica); otherwise their gradients are
    averaged by hand (expert_parallel.average_gradients). With one dp x cp replica ZeRO shards nothing, as
    for a dense model (costmodel.model_states.data_parallel_wrapper: "none"), even where ep folds over tp."""
    return expert_mesh is not None and not uses_ddp(zero_stage=plan.zero_stage) and plan.dp * plan.cp > 1


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
    """The mean over the replicas (dp, and cp: each cp rank's loss is the mean over its share of the tokens)."""
    replicas = par.plan.dp * par.plan.cp
    if par.mesh is None or replicas == 1:
        return float(value)
    t = value.detach().to(torch.float64).reshape(1)
    dist.all_reduce(t, group=replica_mesh(par.mesh, par.plan).get_group())
    return float(t.item()) / replicas


def train_step(par: Parallelized, optimizer: torch.optim.Optimizer, step: int, *, seq_len: int, vocab: int,
               device: torch.device, seed: int = 0) -> float:
    """One optimizer step on batch `step` of the synthetic stream; the loss, averaged over the replicas."""
    plan, model = par.plan, par.model
    batch = global_batch(step=step, global_batch_size=plan.global_batch_size, seq_len=seq_len, vocab=vocab, seed=seed)
    micro = replica_micro_batches(batch, dp=plan.dp, dp_rank=par.coords["dp"], micro_batch_size=plan.micro_batch_size)
    if par.schedule is not None:
        loss_sum = _pipeline_step(par, torch.cat(micro).to(device))
    else:
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, tokens in enumerate(micro):
            set_gradient_sync(model, i == len(micro) - 1)
            with sequence_shard(par.cp, tokens.to(device)) as (inputs, targets):
                logits = model(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / len(micro)
                loss.backward()
            loss_sum += loss.detach().to(torch.float64).cpu()
    if plan.dp * plan.cp > 1 and par.expert_mesh is None and \
            averages_by_hand(zero_stage=plan.zero_stage, tp=plan.tp, pipelined=par.schedule is not None):
        all_reduce_gradients(model, replica_mesh(par.mesh, plan))
    if par.expert_mesh is not None and not _fsdp_experts(plan, par.expert_mesh):
        average_gradients(model, replica_mesh(par.mesh, plan), par.expert_mesh, plan.dp * plan.cp)
    if par.tied:
        sum_tied_gradients(par.tied, par.tied_group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _mean_over_dp(loss_sum, par)


def make_optimizer(par: Parallelized, *, lr: float = 1e-3) -> torch.optim.Optimizer:
    """AdamW for the plan's ZeRO stage (states split over the replicas for stage 1, plain AdamW otherwise);
    with fp32 master weights (executor.precision) when the model's parameters are in a low precision."""
    plan = par.plan
    dp_mesh = replica_mesh(par.mesh, plan) if par.mesh is not None else None
    expert_mesh = par.expert_mesh["edp"] if par.expert_mesh is not None else None
    low = any(p.dtype in (torch.bfloat16, torch.float16) for p in par.model.parameters())
    return build_optimizer(par.model, zero_stage=plan.zero_stage, dp_mesh=dp_mesh, lr=lr, weight_decay=0.0,
                           master_weights=low, expert_mesh=expert_mesh, offload=plan.offload)


def train(par: Parallelized, *, steps: int, seq_len: int, vocab: int, device: torch.device, lr: float = 1e-3,
          seed: int = 0, metrics_path: str | None = None, log=print, checkpoint_dir: str | None = None,
          checkpoint_every: int = 0, keep_checkpoints: int = KEEP_LAST, model_name: str = "model",
          track_memory: bool = False) -> list[dict]:
    """Run optimizer steps 0..steps-1 on the synthetic stream; one metrics dict per step run (and a summary).

    With `checkpoint_dir`, the run first resumes from the newest complete checkpoint there (a restarted job
    goes on where it stopped), then saves after every `checkpoint_every` steps and after the last step,
    keeping the newest `keep_checkpoints`.

    With `track_memory`, the second step run counts every tensor byte (executor.memtrack) and is left out of
    the median step time; the summary gets `tensor_memory_bytes` (the maximum over ranks) and its breakdown."""
    plan = par.plan
    if plan.pp > 1 and plan.num_micro_batches < plan.pp and plan.schedule != "gpipe":
        raise InvalidPlanError(f"{plan.schedule} needs at least pp={plan.pp} micro-batches per replica, "
                               f"got {plan.num_micro_batches}")
    optimizer = make_optimizer(par, lr=lr)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with FolderLock(checkpoint_dir) if checkpoint_dir else nullcontext():  # one run per folder, checked writable
        start = _resume(par, optimizer, checkpoint_dir, model_name=model_name, seed=seed, lr=lr,
                        log=log if rank0 else None) if checkpoint_dir else 0
        return _train_steps(par, optimizer, range(start, steps), seq_len=seq_len, vocab=vocab, device=device,
                            seed=seed, lr=lr, metrics_path=metrics_path if rank0 else None, log=log if rank0 else None,
                            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                            keep_checkpoints=keep_checkpoints, model_name=model_name, track_memory=track_memory)


def _resume(par: Parallelized, optimizer, checkpoint_dir: str, *, model_name: str, seed: int, lr: float, log) -> int:
    """Load the newest complete checkpoint in `checkpoint_dir`, if any; the first step to run."""
    latest, strays = on_rank0(lambda: (latest_checkpoint(checkpoint_dir), stray_entries(checkpoint_dir)))
    if log and strays:
        log(f"note: {checkpoint_dir} also holds {', '.join(strays[:5])}{' ...' if len(strays) > 5 else ''}, "
            "which autoplan did not write; left as it is")
    if latest is None:
        return 0
    start = load_checkpoint(latest, par=par, optimizer=optimizer, model_name=model_name, seed=seed, lr=lr)
    if log:
        log(f"resumed from {latest} (steps 0-{start - 1} done)")
    return start


def _train_steps(par: Parallelized, optimizer, steps: range, *, seq_len: int, vocab: int, device: torch.device,
                 seed: int, lr: float, metrics_path: str | None, log, checkpoint_dir: str | None,
                 checkpoint_every: int, keep_checkpoints: int, model_name: str, track_memory: bool) -> list[dict]:
    """The steps of `train` (rank 0 gets the log and the metrics path, others None)."""
    plan, start, last = par.plan, steps.start, steps.stop - 1
    sink = open(metrics_path, "a") if metrics_path else None
    records = []
    try:
        for step in steps:
            begin = time.perf_counter()
            tracked = track_memory and step == start + 1
            if tracked:
                tensor_memory = _tracked_step(par, optimizer, step, seq_len=seq_len, vocab=vocab, device=device,
                                              seed=seed)
                loss = tensor_memory.pop("loss")
            else:
                loss = train_step(par, optimizer, step, seq_len=seq_len, vocab=vocab, device=device, seed=seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s = _max_over_ranks(time.perf_counter() - begin)
            record = {"step": step, "loss": loss, "step_time_s": step_s,
                      "tokens_per_s": plan.global_batch_size * seq_len / step_s,
                      "max_memory_bytes": int(_max_over_ranks(_peak_memory_bytes(device)))}
            if tracked:
                record["tracked"] = True
            records.append(record)
            if sink:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            if log:
                log(f"step {step:4d}  loss {record['loss']:.4f}  {step_s * 1e3:8.1f} ms  "
                    f"{record['tokens_per_s']:,.0f} tokens/s")
            if checkpoint_dir and (step == last or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
                path = save_checkpoint(checkpoint_dir, par=par, optimizer=optimizer, step=step,
                                       model_name=model_name, keep=keep_checkpoints, seed=seed, lr=lr)
                if log:
                    log(f"saved {path}")
        if records:
            timed = [r for r in records[1:] if not r.get("tracked")] or records[:1]
            times = [r["step_time_s"] for r in timed]
            summary = {"summary": True, "steps": len(records), "first_step": start,
                       "median_step_time_s": statistics.median(times),
                       "tokens_per_s": plan.global_batch_size * seq_len / statistics.median(times),
                       "max_memory_bytes": max(r["max_memory_bytes"] for r in records),
                       "final_loss": records[-1]["loss"], "plan": plan.model_dump()}
            if track_memory and len(records) > 1:
                summary.update(tensor_memory)
            if sink:
                sink.write(json.dumps(summary) + "\n")
    finally:
        if sink:
            sink.close()
    return records


def _tracked_step(par: Parallelized, optimizer: torch.optim.Optimizer, step: int, **kwargs) -> dict:
    """train_step under the tensor-memory tracker: {"loss", "tensor_memory_bytes", "tensor_memory_breakdown"},
    the bytes those of the rank that holds the most."""
    from autoplan.executor.memtrack import RankMemoryTracker

    with RankMemoryTracker(par.model, optimizer) as tracker:
        loss = train_step(par, optimizer, step, **kwargs)
    peak, breakdown = tracker.peak_bytes, tracker.peak_breakdown()
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (peak, breakdown))
        peak, breakdown = max(gathered, key=lambda item: item[0])
    return {"loss": loss, "tensor_memory_bytes": int(peak), "tensor_memory_breakdown": breakdown}


def _pipeline_step(par: Parallelized, tokens: torch.Tensor) -> torch.Tensor:
    """One schedule step over this replica's micro-batches; the mean loss, known on every pp rank."""
    losses: list[torch.Tensor] = []
    with sequence_shard(par.cp, tokens) as (inputs, targets):
        kwargs = {"target": targets, "losses": losses} if par.last else {}
        kwargs["return_outputs"] = False  # else the last stage keeps every micro-batch's logits until the step ends
        if par.first:
            par.schedule.step(inputs, **kwargs)
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
        store = _restart_safe_store()
        if store is None:
            dist.init_process_group("nccl" if cuda else "gloo")
        else:
            dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _restart_safe_store():
    """torchrun's agent store under a prefix of this restart attempt, or None where torch's default is safe.

    torchrun (--max-restarts) keeps one agent-hosted TCPStore for all attempts; in torch 2.13 the workers
    of a restarted attempt read the dead workers' addresses there and the gloo connect hangs or fails.
    Keys under `autoplan/attempt_<n>/` cannot be stale."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"autoplan/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
