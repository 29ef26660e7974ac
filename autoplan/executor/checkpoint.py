"""Save and resume a parallelised training run with torch.distributed.checkpoint (DCP).

On disk, under the directory a run checkpoints into:

    step_<N>/                   a complete checkpoint, the state after optimizer step N
        .metadata, *.distcp     DCP: {"model": ..., "optimizer": ...}, each rank writing its own shards
        meta.json               {"step", "plan", "model", "world_size", "seed", "lr", "files", "format_version"}
                                (rank 0); "files": every other file's size and SHA-256
    step_<N>.tmp/               a checkpoint being written, or left by a job killed while writing: never read
    .autoplan.lock              flock'ed by the run using the folder (one run per folder)

A save writes into step_<N>.tmp and rank 0 renames it to step_<N> once every rank has finished (a barrier),
so a killed job never leaves a half-written checkpoint under a final name. What counts as complete, how
files are checked before torch reads them, and the lock: executor.checkpoint_files.

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

A checkpoint is reloaded by the same plan, model, number of ranks, seed and learning rate only (checked from
meta.json). A checkpoint is never overwritten, and pruning deletes only complete checkpoints.

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
from autoplan.executor.checkpoint_files import (FORMAT_VERSION, META_FILE, SafeLoadPlanner, SafeReader, agree,
                                                check_files, manifest, on_rank0, read_meta, scan)
from autoplan.executor.zero_one import ZeroOneAdamW

KEEP_LAST = 2
_CHUNK_PREFIX = re.compile(r"^((?:state|param_groups)\.)?\d+\.")  # "0.layers.1.w" / "state.0.layers.1.w.exp_avg"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def save_checkpoint(directory, *, par, optimizer: torch.optim.Optimizer, step: int, model_name: str,
                    keep: int = KEEP_LAST, seed: int = 0, lr: float | None = None) -> Path:
    """Write the state after optimizer step `step` to DIR/step_<step>/ (on every rank: collective), then
    delete all but the newest `keep` complete checkpoints in DIR. Returns the checkpoint's path.

    A stale DIR/step_<step>.tmp (a killed save of this step) is cleared first. An existing DIR/step_<step>
    is never replaced: InvalidInputError (on every rank), nothing written."""
    if keep < 1:
        raise InvalidInputError(f"keep={keep}: a run must keep at least one checkpoint")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidInputError(f"checkpoint step must be a non-negative integer, got {step!r}")
    root = Path(directory)
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    on_rank0(lambda: _prepare(root, final, tmp))
    try:
        dcp.save(_on_disk(par, _state(par, optimizer)), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # DCP raises any rank's failure on all ranks
        raise InvalidInputError(f"checkpoint {tmp} could not be written ({_cause(err)})") from None
    _barrier()  # every rank's shards are in tmp
    files = manifest(tmp)
    meta = {"step": step, "plan": par.plan.model_dump(mode="json"), "model": model_name,
            "world_size": _world_size(), "seed": seed, "lr": lr, "files": files, "format_version": FORMAT_VERSION}
    on_rank0(lambda: _publish(root, tmp, final, meta, keep))
    return final


def _prepare(root: Path, final: Path, tmp: Path) -> None:
    if final.exists() or final.is_symlink():
        raise InvalidInputError(f"checkpoint {final} exists already; autoplan does not overwrite a checkpoint "
                                "(train more steps than it holds, or use another --checkpoint-dir)")
    root.mkdir(parents=True, exist_ok=True)
    if tmp.is_symlink():
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)


def _publish(root: Path, tmp: Path, final: Path, meta: dict, keep: int) -> None:
    """meta.json into the finished tmp folder, then its final name (atomic rename), then the pruning."""
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if final.exists() or final.is_symlink():
        raise InvalidInputError(f"checkpoint {final} appeared while {tmp} was written; left both as they are")
    tmp.rename(final)
    for leftover in sorted(root.glob("step_*.pruned")):  # a pruning a kill interrupted
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
    for _, path in scan(root)[0][:-keep]:  # complete checkpoints only; nothing else is deleted
        doomed = path.with_name(path.name + ".pruned")
        path.rename(doomed)  # atomic: a kill during the deletion leaves no half-deleted step_<N> behind
        shutil.rmtree(doomed)


def latest_checkpoint(directory) -> Path | None:
    """The newest complete checkpoint in `directory`, or None if it holds none. InvalidInputError (one
    line) if it holds a step_<N> that is not complete: it is neither read, nor overwritten, nor pruned."""
    complete, problems, _ = scan(Path(directory))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidInputError(problems[0] + more)
    return complete[-1][1] if complete else None


def stray_entries(directory) -> list[str]:
    """Names in `directory` that autoplan did not write (not checkpoints, saves in progress or its lock)."""
    return scan(Path(directory))[2]


def load_checkpoint(path, *, par, optimizer: torch.optim.Optimizer, model_name: str, seed: int = 0,
                    lr: float | None = None) -> int:
    """Load the checkpoint at `path` into the model and optimizer of this run (on every rank: collective);
    returns the step to resume from (the saved step + 1).

    Raises InvalidInputError, in one line, if the checkpoint was written for another plan, model, number of
    ranks, seed or learning rate, or cannot be read (meta.json missing or invalid, files missing, truncated
    or changed since the save: checked against meta.json's manifest before torch reads any of them). Nothing
    on disk is changed; after a failed DCP read the in-memory model may be partly loaded, so stop the run."""
    path = Path(path)
    meta = on_rank0(lambda: read_meta(path))
    _check_compatible(path, meta, plan=par.plan, model_name=model_name, world_size=_world_size(), seed=seed, lr=lr)
    try:
        check_files(path, meta["files"], digests=True)
        SafeReader(path).read_metadata()  # refused here in one line, not inside DCP (which logs tracebacks)
        error = None
    except (InvalidInputError, OSError) as err:
        error = str(err)
    agree(error)
    state = _state(par, optimizer)
    loaded = _on_disk(par, state)
    try:  # in place: tensors copied into, other values replaced
        dcp.load(loaded, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=not dist.is_initialized())
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


def _check_compatible(path: Path, meta: dict, *, plan, model_name: str, world_size: int, seed: int,
                      lr: float | None) -> None:
    """InvalidInputError naming each of plan / model / world size / seed / lr that differs from the checkpoint's."""
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
    for name, value in (("seed", seed), ("lr", lr)):
        if meta[name] != value:
            saved.append(f"{name} {meta[name]}")
            now.append(f"{name} {value}")
    if saved:
        raise InvalidInputError(f"checkpoint {path} was written for {', '.join(saved)}; "
                                f"this run has {', '.join(now)}")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
