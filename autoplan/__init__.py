"""autoplan: find the fastest way to train a PyTorch model on N GPUs, and run it that way.

Public API (re-exports only):
    profile_model(model, seq_len=...) -> ModelProfile
    Cluster.preset(name, gpus=N)      -> Cluster
    Plan(...)                         -> a parallelisation plan
    estimate(profile, cluster, plan)  -> Estimate
    search(profile, cluster, global_batch_size=B, top_k=5) -> SearchResult (.best, .ranked, ...)
"""

from autoplan import models
from autoplan.costmodel import estimate
from autoplan.planner import Constraints, SearchResult, search
from autoplan.errors import (AutoplanError, InfeasiblePlanError, InvalidInputError, InvalidPlanError,
                             ModelLoadError)
from autoplan.schema import (SCHEMA_VERSION, Cluster, Estimate, LayerProfile, Link, ModelProfile, Plan,
                             check_plan)


def profile_model(model, *, seq_len=None, **kwargs):
    """Trace a model (nn.Module built on meta, path to model.py, or built-in name) into a ModelProfile."""
    from autoplan.profiler.model import profile_model as _profile_model  # imports torch

    return _profile_model(model, seq_len=seq_len, **kwargs)


__version__ = "0.1.0"
__all__ = ["SCHEMA_VERSION", "AutoplanError", "Cluster", "Constraints", "Estimate", "InfeasiblePlanError", "InvalidInputError",
           "InvalidPlanError", "LayerProfile", "Link", "ModelLoadError", "ModelProfile", "Plan", "SearchResult",
           "check_plan", "estimate", "models", "profile_model", "search"]
