"""Planner: search space, lower bounds, the partition ILP (OR-Tools CP-SAT), expert defaults."""

from autoplan.planner.search import SearchResult, search
from autoplan.planner.space import Constraints
from autoplan.planner.sweep import SweepResult, SweepRow, sweep

__all__ = ["Constraints", "SearchResult", "SweepResult", "SweepRow", "search", "sweep"]
