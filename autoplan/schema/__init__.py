"""The shared nouns: what (ModelProfile), where (Cluster), how (Plan), and the answer (Estimate).

Every noun is a pydantic model with `extra="forbid"` and a description on each field, serialisable to
JSON with a schema version, so a plan found on a laptop is a file that a 1,000-GPU job loads.
Units are in the names (`_bytes`, `_s`, `_flops`, `_per_s`); everything is SI inside.

One module per part: base (the base noun, bounds, `one_line`), profile (what), cluster (where, and the
software stack), plan (how), plan_file (a plan as a file), result (the answer); every name is imported
from here.
"""

from autoplan.schema.base import MAX_GLOBAL_BATCH, MAX_GPUS, SCHEMA_VERSION, one_line
from autoplan.schema.cluster import PRESETS_DIR, STACKS_DIR, Cluster, EfficiencyPoint, Link, Stack
from autoplan.schema.plan import Offload, Plan, Recompute, Schedule, check_plan, chunks_per_rank
from autoplan.schema.plan_file import PlanFile, parse_plan, parse_plan_file
from autoplan.schema.profile import GemmShape, LayerKind, LayerProfile, ModelProfile, TpSplit
from autoplan.schema.result import DryRunResult, Estimate, StageMemory

__all__ = ["MAX_GLOBAL_BATCH", "MAX_GPUS", "PRESETS_DIR", "SCHEMA_VERSION", "STACKS_DIR", "Cluster", "DryRunResult",
           "EfficiencyPoint", "Estimate", "GemmShape", "LayerKind", "LayerProfile", "Link", "ModelProfile", "Offload",
           "Plan", "PlanFile", "Recompute", "Schedule", "Stack", "StageMemory", "TpSplit", "check_plan",
           "chunks_per_rank", "one_line", "parse_plan", "parse_plan_file"]
