"""Cost model: pure functions for compute, collectives on a topology, memory and pipeline schedules."""
