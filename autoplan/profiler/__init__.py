"""Profiler: model.py -> ModelProfile by tracing on meta; cluster presets and measured clusters."""

from autoplan.profiler.model import profile_model

__all__ = ["profile_model"]
