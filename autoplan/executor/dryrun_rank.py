"""One rank's dry run (executor.dryrun): the plan applied by the executor's own code in the GPU dtype, the
parameters made (fake tensors under a FakeTensorMode, or real ones) and the optimizer built (`prepare`);
training steps run under the memory tracker (`track_steps`); and what a fake process group needs that
`autoplan run` does not: DDP's hook, bucket layout and shape check, and the pipeline stages' shapes
given instead of exchanged."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch._guards import active_fake_mode

from autoplan.errors import InvalidInputError
from autoplan.executor.derived_tp import retie, tied_groups
from autoplan.executor.memtrack import Category, RankMemoryTracker
from autoplan.executor.precision import MIXED_PRECISION_DTYPE
from autoplan.schema import Plan, StageMemory


def _first_step_plan(plan: Plan) -> Plan:
    """Step 1 is there to create the optimizer states and initialise the wrappers; without a pipeline
    (whose schedule fixes the micro-batch count) one micro-batch does that, and step 2 holds the peak."""
    if plan.pp > 1:
        return plan
    return plan.model_copy(update={"global_batch_size": plan.dp * plan.micro_batch_size})


def prepare(model: nn.Module, plan: Plan, *, tp_plan=None, fake_mode=None, seq_len: int | None = None,
            vocab: int | None = None):
    """The executor's `apply` on `model` (built on meta) for the initialised process group, in the GPU dtype,
    then its parameters made (fake tensors under `fake_mode`, else real ones, normal(0, 0.02)) and the
    optimizer built with fp32 master weights: (Parallelized, optimizer)."""
    from autoplan.executor.train import apply, make_optimizer

    model = model.to(MIXED_PRECISION_DTYPE)
    with _static_pipeline_shapes(plan, model, seq_len=seq_len, vocab=vocab):
        par = apply(model, plan, device_type="cpu", tp_plan=tp_plan)
    if fake_mode is not None and hasattr(par.model, "register_comm_hook"):  # DDP (replicate)
        from autoplan.executor.mesh import replica_mesh

        par.model.register_comm_hook(replica_mesh(par.mesh, plan).get_group(), _in_place_all_reduce)
    ties = tied_groups(par.model)
    with fake_mode or ExitStack():
        par.model.to_empty(device="cpu")
        retie(par.model, ties)  # to_empty made each tied name its own tensor
        if getattr(par, "cp", None) is not None:  # context parallelism found the RoPE tables at apply, on meta
            from autoplan.executor.context_parallel import ROPE_TABLE

            par.cp._tables = {id(t): t for m in par.model.modules()
                              if isinstance(t := m._buffers.get(ROPE_TABLE), torch.Tensor)}
        if fake_mode is None:
            with torch.no_grad():
                for param in par.model.parameters():
                    param.normal_(0.0, 0.02)
        optimizer = make_optimizer(par)
    return par, optimizer


def track_steps(par, optimizer, *, steps: int, seq_len: int, vocab: int,
                full_micro_batches: int | None = None, tracer=None) -> StageMemory:
    """Run `steps` training steps (executor.train_step) under the memory tracker, fake or real tensors alike;
    this rank's peak and breakdown. `full_micro_batches`: the plan's count, when `par.plan` runs fewer.
    tracer: an executor.timetrace.StepTracer that records the last step."""
    from autoplan.executor.train import train_step

    plan = par.plan
    tracker = RankMemoryTracker(par.model, optimizer)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(sys.modules[train_step.__module__], "global_batch", _host_batch))
        if active_fake_mode() is not None:
            stack.enter_context(_no_ddp_shape_check())
        stack.enter_context(tracker)
        _init_ddp(par.model, tracker)
        if tracer is not None:
            from autoplan.executor.timetrace import phase_marks

            stack.enter_context(tracer)
            stack.enter_context(phase_marks(tracer, optimizer, sys.modules[train_step.__module__]))
            if hasattr(par.model, "register_comm_hook"):  # DDP
                from torch.distributed._composable.replicate import replicate

                from autoplan.executor.mesh import replica_mesh

                hooks = tracer.watch_ddp(replicate.state(par.model)._ddp, replica_mesh(par.mesh, plan).get_group())
                stack.callback(lambda: [hook.remove() for hook in hooks])
        for step in range(steps):
            tracker.step_label = f"step {step + 1}"
            par.plan = _first_step_plan(plan) if step == 0 and steps > 1 else plan
            if tracer is not None and step == steps - 1:
                tracer.start_step()
            train_step(par, optimizer, step, seq_len=seq_len, vocab=vocab, device=torch.device("cpu"))
        par.plan = plan
        receive = _receive_buffers(par)
        tracker.file(list(receive.values()), Category.BUFFERS)
    # a pipeline schedule holds its receive buffers, and the step's tokens (first stage) and targets (last),
    # for all the plan's micro-batches from the start: add those of the micro-batches not run
    missing = (full_micro_batches or plan.num_micro_batches) - plan.num_micro_batches
    breakdown = tracker.peak_breakdown()
    if par.schedule is not None and missing:
        buffers = sum(t.untyped_storage().nbytes() for t in receive.get(0, ()))  # one micro-batch's
        tokens = plan.micro_batch_size * seq_len * torch.empty((), dtype=torch.long).element_size() * (par.first + par.last)
        breakdown["buffers"] += int(buffers * missing)
        breakdown["activations"] += int(tokens * missing)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return StageMemory(stage=par.coords.get("pp", 0), rank=rank, peak_memory_bytes=sum(breakdown.values()),
                       memory_breakdown=breakdown, peak_phase=tracker.peak_phase,
                       host_memory_bytes=tracker.host_peak_bytes)


def _receive_buffers(par) -> dict[int, list[torch.Tensor]]:
    """The pipeline schedule's receive buffers (activations and gradients) on this rank, per micro-batch, with
    the gradients left on them (the zero-bubble schedule's input-gradient step assigns each its .grad)."""
    found: dict[int, list[torch.Tensor]] = {}
    if par.schedule is None:
        return found
    stages = getattr(par.schedule, "_stages", None) or [par.schedule._stage]
    for stage in stages:
        for table in (stage.args_recv_info, stage.grad_recv_info):
            for micro_batch, infos in table.items():
                for info in infos:
                    buffer = getattr(info, "buffer", None)
                    if buffer is not None:
                        found.setdefault(micro_batch, []).extend([buffer] + ([buffer.grad] if buffer.grad is not None else []))
    return found


def _host_batch(*, step: int, global_batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """The synthetic stream's shape without its values or memory (it lives on the host on a GPU run)."""
    return torch.zeros((), dtype=torch.long).expand(global_batch_size, seq_len + 1)


def _in_place_all_reduce(state, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default hook all-reduces each bucket in place and hands the bucket back; the fake process
    group's futures carry no value, so this hook hands the bucket back itself (no memory either way)."""
    from autoplan.executor.timetrace import active

    tracer = active()
    if tracer is not None:  # the time dry run: the all-reduce the default hook would issue
        tracer.record_ddp_bucket(bucket.buffer(), state)
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


_in_place_all_reduce.__annotations__["return"] = torch.futures.Future[torch.Tensor]  # DDP checks the annotation


class _ReducerWithoutRebuild:
    """DDP's reducer, except that it keeps its first bucket layout: rebuilding the buckets in the order
    gradients became ready (DDP's second forward) broadcasts bucket indices from C++, reading tensor data
    that fake tensors do not have. The rebuilt buckets hold the same bytes."""

    def __init__(self, reducer):
        self._reducer = reducer

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


def _init_ddp(module: nn.Module, tracker: RankMemoryTracker) -> None:
    """Initialise DDP (`replicate`) now rather than at its first forward, so its gradient buckets are
    filed as collective buffers, and keep its first bucket layout (_ReducerWithoutRebuild)."""
    if not hasattr(module, "register_comm_hook"):
        return
    from torch.distributed._composable.replicate import replicate

    state = replicate.state(module)
    with tracker.filing_as_buffers():
        state.lazy_init()
    state._ddp.reducer = _ReducerWithoutRebuild(state._ddp.reducer)


def _no_ddp_shape_check():
    """DDP's first forward checks in C++ that every rank's parameter shapes agree, reading the tensors'
    data, which fake tensors do not have; the shapes agree by construction, so the check is skipped."""
    import torch.nn.parallel.distributed as ddp

    return mock.patch.object(ddp, "_verify_param_shape_across_processes", lambda *args, **kwargs: None)


def _static_pipeline_shapes(plan: Plan, model: nn.Module, *, seq_len: int | None = None, vocab: int | None = None):
    """Give each PipelineStage the shapes it receives and sends (embed -> blocks -> logits of the reference
    models), so no stage asks its neighbour over the fake process group."""
    if plan.pp == 1:
        return ExitStack()
    from torch.distributed.pipelining import PipelineStage

    from autoplan.executor import pipeline

    config = _pipeline_config(model, seq_len, vocab)
    sp = plan.sequence_parallel and plan.tp > 1
    mbs, seq = plan.micro_batch_size, config.seq_len // plan.cp  # a context-parallel rank's share
    hidden = (mbs, seq // plan.tp if sp else seq, config.hidden)  # [b, s/cp (/tp with SP), h] between stages

    def stage(module, chunk, total, device, group=None):
        inputs = torch.empty(mbs, seq, dtype=torch.long, device="meta") if chunk == 0 else \
            torch.empty(hidden, dtype=MIXED_PRECISION_DTYPE, device="meta", requires_grad=True)
        outputs = torch.empty((mbs, seq, config.vocab) if chunk == total - 1 else hidden, dtype=MIXED_PRECISION_DTYPE,
                              device="meta", requires_grad=True)
        return PipelineStage(module, chunk, total, device, input_args=(inputs,), output_args=(outputs,), group=group)
    return mock.patch.object(pipeline, "PipelineStage", stage)


@dataclass(frozen=True)
class _Shapes:
    seq_len: int
    vocab: int
    hidden: int


def _pipeline_config(model: nn.Module, seq_len: int | None, vocab: int | None) -> _Shapes:
    """seq_len, vocab and hidden of what pipeline stages exchange: given, or the model's config, or (hidden)
    its token embedding's width; refused in one line when unknown."""
    config = getattr(model, "config", None)
    embeddings = [m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)]
    seq_len = seq_len or getattr(config, "seq_len", None)
    vocab = vocab or getattr(config, "vocab", None)
    hidden = getattr(config, "hidden", None) or (embeddings[0] if embeddings else None)
    if not (seq_len and vocab and hidden):
        raise InvalidInputError("pp > 1 in a dry run needs seq_len, vocab and hidden: set them in CONFIG (or "
                                "model.config), or give the model an nn.Embedding")
    return _Shapes(int(seq_len), int(vocab), int(hidden))
