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

What differs from `autoplan run` (executor.dryrun_rank), none of it GPU memory:
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
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from autoplan.errors import InvalidInputError, InvalidPlanError
from autoplan.executor.dryrun_rank import prepare, track_steps
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
