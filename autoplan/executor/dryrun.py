"""Dry run: the executor's own code for one rank of an N-rank job, on a fake process group with fake
tensors, with every tensor byte that rank would hold counted (executor.memtrack). No GPU, no memory.

Steps for each pipeline stage that is run (the first and the last by default: the first holds the most
micro-batches in flight, the last the logits):
1. a fake process group of plan.gpus ranks (torch's "fake" backend: collectives return at once), this
   process being the stage's rank with dp, cp, tp coordinates 0 (the largest shards);
2. the model built on the meta device and cast to the GPU dtype (executor.precision: bf16 parameters
   and gradients, fp32 master weights and moments in the optimizer, what the cost model counts);
3. `executor.apply` — the code `autoplan run` uses — applies the plan; the parameters are then
   materialised as fake tensors (`to_empty` under FakeTensorMode) and the optimizer is built;
4. `executor.train_step` runs twice (forward, backward, optimizer) under the memory tracker.

What differs from `autoplan run`, none of it GPU memory:
- the synthetic token stream lives in host memory on a GPU run; it is replaced by a zero batch that
  takes none (`_host_batch`);
- pipeline stages are given their boundary shapes (`PipelineStage(input_args=..., output_args=...)`)
  instead of exchanging them with their neighbours, which a fake process group cannot do;
- DDP's C++ parts read tensor data or the values of collectives: its cross-rank shape check is skipped,
  its gradient buckets keep their first layout (`_ReducerWithoutRebuild`) and its all-reduce hook hands
  each bucket back in place (`_in_place_all_reduce`), as the default hook does;
- `.item()` on a fake tensor answers 1 (executor.memtrack);
- where dropout is on, attention and dropout run the GPU's kernels (autoplan.kernels: fused attention with
  dropout, a 1-byte dropout mask), not the CPU's math fallback, as the profile traces them.
tests/dryrun runs the same plans for real on 2 CPU ranks and gets the same bytes.

Micro-batches: from the second micro-batch of a step on, gradient accumulation repeats the same tensors,
and a pipeline schedule reaches its most micro-batches in flight after its warm-up; so a step runs
min(m, 2) micro-batches without pipeline, min(m, 2·pp) with 1F1B, interleaved or zero-bubble, and all m
with GPipe. A schedule holds its receive buffers and the step's tokens for all m micro-batches from the
start: those of the micro-batches not run are added. Without a pipeline the first step, which only has
to create the optimizer states before the second, runs one micro-batch. tests/dryrun checks the
equivalence against the full count.
"""

from __future__ import annotations

import copy
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch._guards import active_fake_mode

from autoplan.errors import InvalidInputError, InvalidPlanError
from autoplan.executor.derived_tp import retie, tied_groups
from autoplan.executor.memtrack import Category, RankMemoryTracker
from autoplan.executor.precision import MIXED_PRECISION_DTYPE
from autoplan.costmodel.trace_time import StageTime, stage_time, step_time
from autoplan.kernels import gpu_dropout_kernels
from autoplan.schema import Cluster, DryRunResult, Plan, StageMemory

STEPS = 2
PRECISION = "bf16 parameters and gradients; fp32 master weights, momentum and variance in the optimizer"


@dataclass
class _Model:
    """How to build a fresh copy of the model on meta for each stage's run."""

    build: object            # () -> nn.Module on the meta device
    name: str
    seq_len: int
    vocab: int
    tp_plan: object = None
    num_blocks: int = 0


def memory_equivalent_plan(plan: Plan) -> Plan:
    """The plan with as few micro-batches per step as give the same peak memory (module docstring)."""
    m = plan.num_micro_batches
    if plan.pp == 1:
        keep = min(m, 2)
    elif plan.schedule == "gpipe":
        keep = m
    else:
        keep = min(m, 2 * plan.pp)
    return plan.model_copy(update={"global_batch_size": plan.dp * plan.micro_batch_size * keep})


def _first_step_plan(plan: Plan) -> Plan:
    """Step 1 is there to create the optimizer states and initialise the wrappers; without a pipeline
    (whose schedule fixes the micro-batch count) one micro-batch does that, and step 2 holds the peak."""
    if plan.pp > 1:
        return plan
    return plan.model_copy(update={"global_batch_size": plan.dp * plan.micro_batch_size})


def stage_rank(plan: Plan, stage: int) -> int:
    """Global rank of pipeline stage `stage` with dp, cp and tp coordinates 0 (executor.mesh's layout)."""
    return stage * plan.dp * plan.cp * plan.tp


def dry_run(model, plan: Plan, *, gpus: int | None = None, seq_len: int | None = None, stages="ends",
            steps: int = STEPS, time_step: bool = False, cluster: Cluster | None = None,
            trainable: str | None = None) -> DryRunResult:
    """Run `plan` for the fullest rank of each chosen pipeline stage on a fake process group of `gpus`
    ranks and report its peak memory per GPU and breakdown (a DryRunResult).

    model: an nn.Module built on the meta device, a path to a model.py, or a built-in name.
    stages: "ends" (first and last), "all", or a list of stage indices.
    time_step: also record what the last step runs (executor.timetrace) and price it on `cluster` (default
    the dgx-h100 preset) with costmodel.trace_time: step_time_s and time_breakdown. trainable: a regular
    expression of the parameters that train (the others frozen: models.finetune). With a pipeline of more
    than two stages "ends" then also runs stage 1, whose time stands for the middle stages (all stages
    when they hold different block counts).
    """
    start = time.perf_counter()
    if gpus is not None and gpus != plan.gpus:
        raise InvalidPlanError(f"dp*tp*pp*cp = {plan.gpus} but --gpus is {gpus}")
    if dist.is_initialized():
        raise InvalidInputError("a dry run needs a process without an initialised process group")
    spec = _model_spec(model, seq_len)
    if trainable is not None:  # only the parameters it matches train (models.finetune)
        from autoplan.models.finetune import apply_trainable

        build = spec.build
        spec.build = lambda: apply_trainable(build(), trainable)
    run_plan = memory_equivalent_plan(plan)
    cluster = cluster or Cluster.preset("dgx-h100", gpus=plan.gpus) if time_step else None
    chosen = _stages(plan, stages)
    if time_step and stages == "ends":
        chosen = timed_stages(plan, spec.num_blocks)
    traced = [_run_stage(spec, run_plan, stage, steps, plan, cluster=cluster) for stage in chosen]
    results = [memory for memory, _, _ in traced]
    peak = max(results, key=lambda r: r.peak_memory_bytes)
    notes = []
    if run_plan.num_micro_batches != plan.num_micro_batches:
        notes.append(f"ran {run_plan.num_micro_batches} of the plan's {plan.num_micro_batches} micro-batches "
                     f"per step (memory-equivalent)")
    result = DryRunResult(model=spec.name, plan=plan, gpus=plan.gpus, seq_len=spec.seq_len, precision=PRECISION,
                          steps=steps, micro_batches_per_step=run_plan.num_micro_batches,
                          peak_memory_bytes=peak.peak_memory_bytes, memory_breakdown=peak.memory_breakdown,
                          host_memory_bytes=max(r.host_memory_bytes for r in results),
                          peak_stage=peak.stage, stages=results, notes=notes)
    if time_step:
        timed = {memory.stage: timing for memory, timing, _ in traced}
        per_rank = [timed.get(rank) or timed[min(timed, key=lambda s: (s in (0, plan.pp - 1), s))]
                    for rank in range(plan.pp)]
        step_s, breakdown = step_time(per_rank, plan, cluster)
        result = result.model_copy(update={"step_time_s": step_s, "time_breakdown": breakdown,
                                           "cluster": cluster.name})
        result._traces.update({memory.stage: events for memory, _, events in traced})
        notes.append("time: the last step's ops priced on the cluster (costmodel.trace_time); the CPU's dispatch "
                     "time is not counted")
    return result.model_copy(update={"wall_s": time.perf_counter() - start})


def timed_stages(plan: Plan, num_blocks: int) -> list[int]:
    """The pipeline stages a time dry run runs: the first and the last, and stage 1 for the middle ones
    when they all hold the same number of blocks (else every stage)."""
    if plan.pp <= 2:
        return sorted({0, plan.pp - 1})
    from autoplan.costmodel.estimate import even_split

    chunks = plan.layers_per_stage or even_split(num_blocks, plan.pp * plan.virtual_stages)
    per_rank = [sum(chunks[rank::plan.pp]) for rank in range(plan.pp)]
    if len(set(per_rank[1:-1])) > 1:
        return list(range(plan.pp))
    return [0, 1, plan.pp - 1]


def verify_plans(ranked, model, cluster: Cluster, *, seq_len: int | None = None, top: int | None = None,
                 progress=None) -> tuple[list[tuple], list[tuple]]:
    """Dry-run the first `top` of the ranked (plan, estimate) pairs; keep, in their order, those whose
    measured peak plus the cluster's reserve fits in GPU memory. Returns (kept, dropped): kept a list of
    (plan, estimate, DryRunResult), dropped of (plan, estimate, DryRunResult or why the executor refuses it)."""
    chosen = list(ranked)[:top] if top else list(ranked)
    kept, dropped = [], []
    for index, (plan, estimate) in enumerate(chosen):
        try:
            result = dry_run(model, plan, seq_len=seq_len)
        except InvalidPlanError as err:  # the executor does not run it: nothing to verify, nothing to run
            dropped.append((plan, estimate, str(err)))
        else:
            (kept if result.fits(cluster) else dropped).append((plan, estimate, result))
        if progress:
            progress(index + 1, len(chosen))
    return kept, dropped


def _stages(plan: Plan, stages) -> list[int]:
    if stages == "ends":
        return sorted({0, plan.pp - 1})
    if stages == "all":
        return list(range(plan.pp))
    chosen = sorted(set(stages))
    if not chosen or chosen[0] < 0 or chosen[-1] >= plan.pp:
        raise InvalidInputError(f"stages {chosen} must lie in 0..{plan.pp - 1}")
    return chosen


def _model_spec(model, seq_len: int | None) -> _Model:
    if isinstance(model, nn.Module):
        from autoplan.models.hf import wrap_hf_model

        model = wrap_hf_model(model, seq_len=seq_len)  # a transformers causal LM: laid out as the HF configs are
        if any(not p.is_meta for p in model.parameters()):
            raise InvalidInputError("dry_run takes a model built on the meta device "
                                    "(`with torch.device('meta'):`), a model.py path or a built-in name")
        config = getattr(model, "config", None)
        seq_len = seq_len or getattr(config, "seq_len", None)
        vocab = getattr(config, "vocab", None)
        if not seq_len or not vocab:
            raise InvalidInputError("the model has no config.seq_len / config.vocab: pass seq_len=... "
                                    "(the vocabulary comes from config.vocab)")
        return _Model(lambda: copy.deepcopy(model), type(model).__name__, seq_len, vocab,
                      num_blocks=len(getattr(model, "layers", ())))
    from autoplan.models.loader import load_model, seq_len_overrides

    spec = str(model)
    overrides = seq_len_overrides(spec, seq_len)
    loaded = load_model(spec, device="meta", **overrides)
    module = loaded.module
    seq_len = seq_len or loaded.seq_len or getattr(getattr(module, "config", None), "seq_len", None)
    vocab = loaded.config.get("vocab") or getattr(getattr(module, "config", None), "vocab", None)
    if not seq_len or not vocab:
        raise InvalidInputError(f"{spec}: set CONFIG['seq_len'] and CONFIG['vocab'] in the model file")
    first = [module]

    def build():  # the loaded module for the first stage, a fresh load for each further one
        return first.pop() if first else load_model(spec, device="meta", **overrides).module
    return _Model(build, loaded.name, seq_len, vocab, loaded.tp_plan, num_blocks=len(getattr(module, "layers", ())))


def _run_stage(spec: _Model, plan: Plan, stage: int, steps: int, full_plan: Plan,
               cluster: Cluster | None = None) -> tuple[StageMemory, StageTime | None, list]:
    """One stage's memory; with a cluster also its last step's trace, priced, and the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    rank = stage_rank(plan, stage)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=plan.gpus)
    try:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        par, optimizer = prepare(spec.build(), plan, tp_plan=spec.tp_plan, fake_mode=fake, seq_len=spec.seq_len,
                                 vocab=spec.vocab)
        tracer = None
        if cluster is not None:
            from autoplan.executor.timetrace import StepTracer

            tracer = StepTracer(plan, gpus_per_node=cluster.gpus_per_node)
        with fake, gpu_dropout_kernels():  # dropout as a GPU runs it (autoplan.kernels), as the profile does
            memory = track_steps(par, optimizer, steps=steps, seq_len=spec.seq_len, vocab=spec.vocab,
                                 full_micro_batches=full_plan.num_micro_batches, tracer=tracer)
        memory = memory.model_copy(update={"stage": stage, "rank": rank})
        if tracer is None:
            return memory, None, []
        timing = stage_time(tracer.events, cluster, stage=stage, micro_batches_run=plan.num_micro_batches,
                            micro_batches=full_plan.num_micro_batches)
        return memory.model_copy(update={"fwd_s": timing.fwd_s, "bwd_s": timing.bwd_s,
                                         "after_backward_s": timing.after_backward_s,
                                         "trace_ops": len(tracer.events)}), timing, tracer.events
    finally:
        dist.destroy_process_group()
        _forget_meshes()


def _forget_meshes() -> None:
    """DTensor caches sharding decisions by value, device meshes included: a later stage's run (a new fake
    process group, equal meshes) would get this one's meshes back, whose process groups are gone."""
    from torch.distributed.tensor import DTensor, _collective_utils, _redistribute

    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ dispatch fast path's
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    type(propagator)._propagate_tensor_meta_cached.cache_clear()
    _redistribute._gen_transform_infos.cache_clear()
    _redistribute.clear_redistribute_planner_cache()
    _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()


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
