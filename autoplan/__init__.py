"""autoplan: find the fastest way to train a PyTorch model on N GPUs, and run it that way.

Public API (re-exports only):
    profile_model(model, seq_len=...) -> ModelProfile
    Cluster.preset(name, gpus=N)      -> Cluster
    Plan(...)                         -> a parallelisation plan
    estimate(profile, cluster, plan)  -> Estimate
    search(profile, cluster, global_batch_size=B, top_k=5) -> SearchResult (.best, .ranked, ...)
    dryrun(model, plan, gpus=N)       -> DryRunResult (peak memory per GPU and its breakdown, measured)
    verify_plans(ranked, model, cluster) -> the ranked plans with their dry runs, those over memory dropped
    sweep(profile, cluster, gpus=(8, 1024), global_batch_size=B, tokens=1e12) -> SweepResult (best plan per
                                      GPU count, tokens/s per GPU, time to train, GPU-hours, cost)
"""

from autoplan import models
from autoplan.costmodel import estimate
from autoplan.planner import Constraints, SearchResult, SweepResult, search, sweep
from autoplan.errors import (AutoplanError, InfeasiblePlanError, InvalidInputError, InvalidPlanError,
                             ModelLoadError)
from autoplan.schema import (SCHEMA_VERSION, Cluster, DryRunResult, Estimate, LayerProfile, Link, ModelProfile, Stack,
                             Plan, check_plan)


def profile_model(model, *, seq_len=None, **kwargs):
    """Trace a model (nn.Module built on meta, path to model.py, or built-in name) into a ModelProfile."""
    from autoplan.profiler.model import profile_model as _profile_model  # imports torch

    return _profile_model(model, seq_len=seq_len, **kwargs)


def dryrun(model, plan, *, gpus=None, seq_len=None, stages="ends", time=False, cluster=None, trainable=None):
    """Run `plan` with the executor's code for the fullest rank of each chosen pipeline stage of a `gpus`-rank
    job, on a fake process group with fake tensors, and count every tensor byte: a DryRunResult with
    peak_memory_bytes and memory_breakdown. `model`: an nn.Module built on meta, a model.py path or a
    built-in name. No memory is allocated for the model.
    time=True: also record each op and collective of the last step and price them on `cluster` (a Cluster;
    default the dgx-h100 preset) with the estimate's formulas: .step_time_s and .time_breakdown."""
    from autoplan.executor.dryrun import dry_run  # imports torch

    return dry_run(model, plan, gpus=gpus, seq_len=seq_len, stages=stages, time_step=time, cluster=cluster,
                   trainable=trainable)


def verify_plans(ranked, model, cluster, *, seq_len=None, top=None, progress=None):
    """Dry-run the ranked (plan, estimate) pairs (the first `top`) and keep those whose measured peak plus
    the cluster's reserve fits in GPU memory: a list of (plan, estimate, DryRunResult), and the dropped ones."""
    from autoplan.executor.dryrun import verify_plans as _verify_plans  # imports torch

    return _verify_plans(ranked, model, cluster, seq_len=seq_len, top=top, progress=progress)


__version__ = "0.1.0"
__all__ = ["SCHEMA_VERSION", "AutoplanError", "Cluster", "Stack", "Constraints", "DryRunResult", "Estimate", "InfeasiblePlanError",
           "InvalidInputError", "InvalidPlanError", "LayerProfile", "Link", "ModelLoadError", "ModelProfile", "Plan",
           "SearchResult", "SweepResult", "check_plan", "dryrun", "estimate", "models", "profile_model", "search", "sweep", "verify_plans"]
