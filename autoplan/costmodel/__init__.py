"""Cost model: pure functions from (ModelProfile, Cluster, Plan) to an Estimate. Never imports torch."""

from autoplan.costmodel.estimate import estimate

__all__ = ["estimate"]
