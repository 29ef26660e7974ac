"""Load a model by built-in name or from a user's model.py (`build_model()`, optional `CONFIG` dict)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from autoplan.errors import ModelLoadError, first_line
from autoplan.models.configs import NAMED_CONFIGS, build_named, named_config


@dataclass
class LoadedModel:
    module: nn.Module
    name: str
    config: dict = field(default_factory=dict)  # at least seq_len when known
    tp_plan: Callable | None = None              # model.py's tp_plan(model, sequence_parallel) -> layout

    @property
    def seq_len(self) -> int | None:
        return self.config.get("seq_len")


def is_model_file(spec: str) -> bool:
    """A path (a model.py, a Hugging Face config.json or model folder) rather than a built-in name."""
    return spec.endswith(".py") or spec.endswith(".json") or "/" in spec or Path(spec).exists()


def seq_len_overrides(spec: str, seq_len: int | None) -> dict:
    """{"seq_len": seq_len} where the model is built for a sequence length (built-in names, Hugging Face
    configs); a model.py's own CONFIG says its length, and seq_len is only the profile's."""
    from autoplan.models.hf import is_hf_spec

    return {"seq_len": seq_len} if seq_len and (not is_model_file(spec) or is_hf_spec(spec)) else {}


def load_model(spec: str, *, device: str | torch.device = "meta", **overrides) -> LoadedModel:
    """A built-in name (llama3-70b, gpt-tiny, ...), a path to model.py, or a Hugging Face config.json or local
    model folder (autoplan.models.hf; `seq_len` may be overridden), built on `device`."""
    from autoplan.models.hf import is_hf_spec, load_hf

    if is_hf_spec(spec):
        unknown = set(overrides) - {"seq_len"}
        if unknown:
            raise ModelLoadError(f"{spec}: only seq_len can be overridden for a Hugging Face config, not "
                                 f"{', '.join(sorted(unknown))}")
        module, config = load_hf(spec, device=device, seq_len=overrides.get("seq_len"))
        return LoadedModel(module, spec, config)
    if not is_model_file(spec):
        if spec not in NAMED_CONFIGS:
            raise ModelLoadError(f"unknown model {spec!r}: give a path to a model.py, a Hugging Face config.json "
                                 f"or model folder, or one of "
                                 f"{', '.join(NAMED_CONFIGS)}")
        with torch.device(device):
            module = build_named(spec, **overrides)
        return LoadedModel(module, spec, {**named_config(spec), **overrides})
    return _load_file(Path(spec), device)


def _load_file(path: Path, device: str | torch.device) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    module_name = f"autoplan_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path} as Python")
    user = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = user
    try:
        spec.loader.exec_module(user)
    except SystemExit as err:  # the user's code: report it in one line, exit as a bad input
        raise ModelLoadError(f"{path} called sys.exit({err.code!r}) while importing") from None
    except Exception as err:
        raise ModelLoadError(f"{path} raised while importing: {first_line(err)}") from None
    build = getattr(user, "build_model", None)
    if not callable(build):
        raise ModelLoadError(f"{path} does not define build_model()")
    config = getattr(user, "CONFIG", None) or {}
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: CONFIG must be a dict (e.g. {{'seq_len': 2048}}), got {type(config).__name__}")
    try:
        with torch.device(device):
            module = build()
    except SystemExit as err:
        raise ModelLoadError(f"{path}: build_model() called sys.exit({err.code!r})") from None
    except Exception as err:
        raise ModelLoadError(f"{path}: build_model() raised {first_line(err)}") from None
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{path}: build_model() returned {type(module).__name__}, not a torch.nn.Module")
    tp_plan = getattr(user, "tp_plan", None)
    return LoadedModel(module, str(path), dict(config), tp_plan if callable(tp_plan) else None)
