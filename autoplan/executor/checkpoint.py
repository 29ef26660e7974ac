"""Save and resume a parallelised training run with torch.distributed.checkpoint (DCP).

On disk, under the directory a run checkpoints into:

    step_<N>/                   a complete checkpoint, the state after optimizer step N
        .metadata, *.distcp     DCP: {"model": ..., "optimizer": ...}, each rank writing its own shards
        meta.json               {"step", "plan", "model", "world_size", "format_version"} (rank 0)
    step_<N>.tmp/               a checkpoint being written, or left by a job killed while writing: never read

A save writes into step_<N>.tmp and rank 0 renames it to step_<N> once every rank has finished (a barrier),
so a killed job never leaves a half-written checkpoint under a final name.

Keys are the model's own parameter names (`layers.3.attention.wq.weight`): DCP's
`get_model_state_dict` / `get_optimizer_state_dict` strip the wrappers (DDP `replicate`, FSDP2,
checkpoint_wrapper) and keep DTensors (FSDP2, TP) sharded, each rank writing its shards. With pp > 1,
`par.model` is a ModuleList of this rank's chunks; each chunk is the model with other blocks deleted, so
its names are global, and the chunks hold disjoint blocks (embedding, final norm and output only in their
chunk): the ModuleList's `<chunk>.` prefix is dropped and the chunks' states merge into one dict. The
optimizer state is flattened (`state.<param>.exp_avg`, `param_groups.<param>.lr`: DCP's
`flatten_optimizer_state_dict`, made for pipelines), so every key names one parameter.

ZeRO-1's optimizer (executor.zero_one) keeps a different chunk of every parameter's states on each rank;
it saves them under keys of its rank's own (`rank<r>.state.<name>.exp_avg`), which a resume with the
same plan and number of ranks (checked below) reads back on the same rank.

A checkpoint is reloaded by the same plan, model and number of ranks only (checked from meta.json).

No RNG state is saved: the data stream is a pure function of (seed, step) (`executor.data.global_batch`)
and the training step draws no random numbers while dropout is 0 (the reference models' default). A model
with dropout > 0 resumes with fresh dropout masks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from autoplan.errors import InvalidInputError, first_line
from autoplan.executor.zero_one import ZeroOneAdamW

FORMAT_VERSION = 1
META_FILE = "meta.json"
KEEP_LAST = 2
_STEP_DIR = re.compile(r"step_(\d+)")
_CHUNK_PREFIX = re.compile(r"^((?:state|param_groups)\.)?\d+\.")  # "0.layers.1.w" / "state.0.layers.1.w.exp_avg"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def save_checkpoint(directory, *, par, optimizer: torch.optim.Optimizer, step: int, model_name: str,
                    keep: int = KEEP_LAST) -> Path:
    """Write the state after optimizer step `step` to DIR/step_<step>/ (on every rank: collective), then
    delete all but the newest `keep` complete checkpoints in DIR. Returns the checkpoint's path.

    A stale DIR/step_<step>.tmp (a killed save of this step) is cleared first; an existing DIR/step_<step>
    (a run resumed from an older step) is replaced only after the new one is complete."""
    if keep < 1:
        raise InvalidInputError(f"keep={keep}: a run must keep at least one checkpoint")
    root = Path(directory)
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    dcp.save(_on_disk(par, _state(par, optimizer)), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    if _rank() == 0:
        meta = {"step": step, "plan": par.plan.model_dump(mode="json"), "model": model_name,
                "world_size": _world_size(), "format_version": FORMAT_VERSION}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    _barrier()  # every rank's shards are in tmp
    if _rank() == 0:
        _publish(tmp, final)
        _prune(root, keep)
    _barrier()  # nobody returns (or saves again) before the checkpoint has its final name
    return final


def latest_checkpoint(directory) -> Path | None:
    """The newest complete checkpoint in `directory` (step_<N> with a meta.json), or None."""
    complete = _complete_checkpoints(Path(directory))
    return complete[-1][1] if complete else None


def load_checkpoint(path, *, par, optimizer: torch.optim.Optimizer, model_name: str) -> int:
    """Load the checkpoint at `path` into the model and optimizer of this run (on every rank: collective);
    returns the step to resume from (the saved step + 1).

    Raises InvalidInputError, in one line, if the checkpoint was written for another plan, model or number
    of ranks, or cannot be read (meta.json missing or invalid, DCP files missing or truncated). Nothing on
    disk is changed; after a failed DCP read the in-memory model may be partly loaded, so stop the run."""
    path = Path(path)
    meta = _read_meta(path)
    _check_compatible(path, meta, plan=par.plan, model_name=model_name, world_size=_world_size())
    state = _state(par, optimizer)
    loaded = _on_disk(par, state)
    try:
        dcp.load(loaded, checkpoint_id=path, no_dist=not dist.is_initialized())  # in place: tensors copied into, other values replaced
    except (Exception, CheckpointException) as err:  # DCP raises any rank's failure on all ranks
        raise InvalidInputError(f"checkpoint {path} could not be read ({_cause(err)}): files missing, "
                                "truncated or from another run") from None
    if loaded is not state:
        state = {part: {key: loaded[part][_global_key(key)] for key in values} for part, values in state.items()}
    _set_state(par, optimizer, state)
    return meta["step"] + 1


def _state(par, optimizer: torch.optim.Optimizer) -> dict:
    """{"model": ..., "optimizer": ...} as the setters take them (with pp > 1, keys carry the chunk index)."""
    model = get_model_state_dict(par.model, options=_OPTIONS)
    if isinstance(optimizer, ZeroOneAdamW):
        return {"model": model, "optimizer": optimizer.rank_state_dict(_names(par))}
    return {"model": model, "optimizer": get_optimizer_state_dict(par.model, optimizer, options=_OPTIONS)}


def _names(par) -> dict[int, str]:
    return {id(param): name for name, param in par.model.named_parameters()}


def _on_disk(par, state: dict) -> dict:
    """`state` keyed as on disk: global parameter names, the pipeline chunk index dropped."""
    if par.plan.pp == 1:
        return state
    renamed = {part: {_global_key(key): value for key, value in values.items()} for part, values in state.items()}
    for part, values in state.items():
        assert len(renamed[part]) == len(values), "two pipeline chunks on one rank hold a parameter of one name"
    return renamed


def _global_key(key: str) -> str:
    """'0.layers.1.w' -> 'layers.1.w'; 'state.0.layers.1.w.exp_avg' -> 'state.layers.1.w.exp_avg'."""
    return _CHUNK_PREFIX.sub(r"\1", key, count=1)


def _set_state(par, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put `state` (keyed as `_state` returns it) into the model and optimizer."""
    set_model_state_dict(par.model, state["model"], options=_OPTIONS)
    if isinstance(optimizer, ZeroOneAdamW):
        optimizer.load_rank_state_dict(state["optimizer"], _names(par))
    else:
        set_optimizer_state_dict(par.model, optimizer, state["optimizer"], options=_OPTIONS)


def _cause(err: BaseException) -> str:
    """'rank R: Type: message' of the first rank's failure in a CheckpointException, else the error's."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (cause, _) = min(err.failures.items(), key=lambda item: item[0])
        return f"rank {rank}: {first_line(cause)}"
    return first_line(err)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished tmp directory to its final name, replacing an older checkpoint of that step."""
    if not final.exists():
        tmp.rename(final)
        return
    replaced = final.with_name(final.name + ".replaced")
    if replaced.exists():
        shutil.rmtree(replaced)
    final.rename(replaced)
    tmp.rename(final)
    shutil.rmtree(replaced)


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints; nothing else in `root` is touched."""
    for _, path in _complete_checkpoints(root)[:-keep]:
        shutil.rmtree(path)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_<N> directory with a meta.json in `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and (path / META_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _read_meta(path: Path) -> dict:
    """meta.json of the checkpoint at `path`, or InvalidInputError saying why it cannot be used."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"checkpoint {path} has no {META_FILE} (not a checkpoint, or incomplete)") from None
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"checkpoint {path}: {META_FILE} cannot be read: {first_line(err)}") from None
    expected = {"step", "plan", "model", "world_size", "format_version"}
    if not isinstance(meta, dict) or not expected <= meta.keys():
        raise InvalidInputError(f"checkpoint {path}: {META_FILE} lacks one of {sorted(expected)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise InvalidInputError(f"checkpoint {path} has format_version {meta['format_version']}; "
                                f"this autoplan reads {FORMAT_VERSION}")
    return meta


def _check_compatible(path: Path, meta: dict, *, plan, model_name: str, world_size: int) -> None:
    """InvalidInputError naming each of plan / model / world size that differs from the checkpoint's."""
    current_plan = plan.model_dump(mode="json")
    saved, now = [], []
    if meta["plan"] != current_plan:
        fields = sorted(set(meta["plan"]) | set(current_plan))
        differ = [f for f in fields if meta["plan"].get(f) != current_plan.get(f)]
        saved.append("plan " + " ".join(f"{f}={meta['plan'].get(f)}" for f in differ))
        now.append("plan " + " ".join(f"{f}={current_plan.get(f)}" for f in differ))
    if meta["model"] != model_name:
        saved.append(f"model {meta['model']}")
        now.append(f"model {model_name}")
    if meta["world_size"] != world_size:
        saved.append(f"{meta['world_size']} ranks")
        now.append(f"{world_size} ranks")
    if saved:
        raise InvalidInputError(f"checkpoint {path} was written for {', '.join(saved)}; "
                                f"this run has {', '.join(now)}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
