"""The checkpoint folder as a contract: what autoplan wrote there, what it will read, and who may write.

- **Listing.** `step_<N>` (N a non-negative integer, written canonically) is a checkpoint; it is complete
  when its meta.json is valid, names step N and lists every other file of the checkpoint with its size and
  SHA-256 (the manifest). A `step_<N>` that is not complete was not published by autoplan (a save
  publishes by renaming a finished `step_<N>.tmp`): it is refused in one line and left untouched, never
  read, overwritten or pruned. `step_<N>.tmp` is a save in progress or one a killed job left: never read.
  Anything else in the folder is reported as not autoplan's and left alone.
- **Reading.** Before torch reads a file of a checkpoint, the files are checked against the manifest
  (names, sizes, digests; each rank hashes its share). torch.distributed.checkpoint reads `.metadata`
  with `pickle` and non-tensor values with `torch.load(weights_only=False)`: autoplan reads `.metadata`
  with an unpickler that builds only DCP's metadata classes, torch.Size, dtypes and layouts, and loads
  non-tensor values with `weights_only=True`, so a crafted file cannot run code even with a forged manifest.
- **One run per folder.** Rank 0 holds an exclusive `flock` on `<folder>/.autoplan.lock` while training;
  the kernel drops it when the process dies, so a killed run never blocks the next one. The folder is
  created and checked writable before the first step.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import re
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from autoplan.errors import InvalidInputError, first_line

FORMAT_VERSION = 2  # 2: a manifest of the files' sizes and SHA-256, seed and learning rate recorded
META_FILE = "meta.json"
LOCK_FILE = ".autoplan.lock"
META_KEYS = {"step", "plan", "model", "world_size", "seed", "lr", "files", "format_version"}
_STEP_DIR = re.compile(r"step_(0|[1-9][0-9]*)")
_TMP_DIR = re.compile(r"step_(0|[1-9][0-9]*)\.(tmp|pruned)")  # a save, or a pruning, in progress
_HASH_CHUNK_BYTES = 2**24


# ------------------------------------------------------------------------------------- listing
def scan(root: Path) -> tuple[list[tuple[int, Path]], list[str], list[str]]:
    """(complete checkpoints as (step, path) oldest first, problems, stray entries) of the folder `root`.
    Cheap: meta.json and file sizes only (digests are checked when a checkpoint is loaded)."""
    complete, problems, strays = [], [], []
    if not root.is_dir():
        return complete, problems, strays
    for path in sorted(root.iterdir()):
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            try:
                meta = read_meta(path)
                check_files(path, meta["files"], digests=False)
                complete.append((int(match.group(1)), path))
            except InvalidInputError as err:
                problems.append(str(err))
        elif path.name != LOCK_FILE and not (_TMP_DIR.fullmatch(path.name) and path.is_dir()):
            strays.append(path.name)
    return sorted(complete), problems, strays


def read_meta(path: Path) -> dict:
    """meta.json of the checkpoint at `path`, checked: every key there, of its type, the step that of the
    folder's name; or InvalidInputError saying why it cannot be used."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise InvalidInputError(f"checkpoint {path} has no {META_FILE}: not complete, or not written by autoplan; "
                                "move it out of the folder (autoplan neither reads nor deletes it)") from None
    except (OSError, ValueError, RecursionError) as err:
        raise InvalidInputError(f"checkpoint {path}: {META_FILE} cannot be read: {first_line(err)}") from None
    if not isinstance(meta, dict) or not META_KEYS <= meta.keys():
        missing = sorted(META_KEYS - meta.keys()) if isinstance(meta, dict) else sorted(META_KEYS)
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version is not None and version != FORMAT_VERSION:
            raise InvalidInputError(f"checkpoint {path} has format_version {version}; this autoplan reads "
                                    f"{FORMAT_VERSION}")
        raise InvalidInputError(f"checkpoint {path}: {META_FILE} lacks {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise InvalidInputError(f"checkpoint {path} has format_version {meta['format_version']}; "
                                f"this autoplan reads {FORMAT_VERSION}")
    step = meta["step"]
    if not _whole(step) or step < 0 or path.name != f"step_{step}":
        raise InvalidInputError(f"checkpoint {path}: {META_FILE} says step {step!r}, not the folder's step")
    kinds = {"plan": dict, "model": str, "files": dict}
    wrong = [key for key, kind in kinds.items() if not isinstance(meta[key], kind)]
    wrong += [key for key in ("world_size", "seed") if not _whole(meta[key])]
    if meta["lr"] is not None and (not isinstance(meta["lr"], (int, float)) or isinstance(meta["lr"], bool)):
        wrong.append("lr")
    if not wrong and not all(_file_entry(name, entry) for name, entry in meta["files"].items()):
        wrong.append("files")
    if wrong or meta["world_size"] < 1:
        raise InvalidInputError(f"checkpoint {path}: {META_FILE} has an invalid {(wrong or ['world_size'])[0]}")
    return meta


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _file_entry(name, entry) -> bool:
    return (isinstance(name, str) and "/" not in name and name not in ("", ".", "..", META_FILE)
            and isinstance(entry, dict) and _whole(entry.get("bytes")) and isinstance(entry.get("sha256"), str))


# ------------------------------------------------------------------------------------- manifest
def manifest(path: Path) -> dict:
    """{file name: {"bytes", "sha256"}} of every file of the checkpoint being written at `path` but
    meta.json; each rank hashes its share and rank 0 gathers them (collective)."""
    names = sorted(p.name for p in path.iterdir() if p.name != META_FILE)
    share = {name: _digest(path / name) for name in names[_rank()::_world_size()]}
    return {name: entry for part in _gather(share) for name, entry in part.items()}


def check_files(path: Path, files: dict, *, digests: bool) -> None:
    """InvalidInputError unless the checkpoint at `path` holds exactly the manifest's files, of its sizes
    (and, with `digests`, this rank's share of them with its SHA-256s)."""
    present = {p.name for p in path.iterdir() if p.name != META_FILE}
    if present != files.keys():
        missing, extra = sorted(files.keys() - present), sorted(present - files.keys())
        what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which autoplan did not write"
        raise InvalidInputError(f"checkpoint {path} {what}: damaged or changed since it was saved")
    for name in sorted(files):
        size = (path / name).stat().st_size
        if size != files[name]["bytes"]:
            raise InvalidInputError(f"checkpoint {path}: {name} has {size:,} bytes, the manifest {files[name]['bytes']:,}: "
                                    "truncated or changed since it was saved")
    if digests:
        for name in sorted(files)[_rank()::_world_size()]:
            if _digest(path / name)["sha256"] != files[name]["sha256"]:
                raise InvalidInputError(f"checkpoint {path}: {name} does not match its SHA-256 in {META_FILE}: "
                                        "changed since it was saved")


def _digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


# ------------------------------------------------------------------------------------- reading without pickle's code
def _safe_globals() -> dict[tuple[str, str], object]:
    """What `.metadata` may name: DCP's metadata classes, torch.Size, torch's dtypes and layouts, paths."""
    module = dcp_metadata.__name__
    allowed = {(module, name): getattr(dcp_metadata, name) for name in
               ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    allowed[(_StorageInfo.__module__, "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("pathlib", "PosixPath")] = allowed[("pathlib", "PurePosixPath")] = Path
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """pickle restricted to _safe_globals (the Python docs' "Restricting Globals")."""

    allowed = None

    def find_class(self, module: str, name: str):
        allowed = type(self).allowed = type(self).allowed or _safe_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return allowed[(module, name)]


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read by _MetadataUnpickler instead of pickle."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as handle:
                meta = _MetadataUnpickler(handle).load()
        except Exception as err:  # any failure of a hostile or damaged file: one message
            raise InvalidInputError(f"checkpoint {self.path}: .metadata refused ({first_line(err)})") from None
        if not isinstance(meta, dcp_metadata.Metadata):
            raise InvalidInputError(f"checkpoint {self.path}: .metadata holds {type(meta).__name__}, not DCP metadata")
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = dcp_metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with non-tensor values read by torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ------------------------------------------------------------------------------------- one run per folder
class FolderLock:
    """An exclusive flock on <folder>/.autoplan.lock held by rank 0 (collective to create: every rank gets
    the same InvalidInputError if the folder cannot be created, is not writable or is in use)."""

    def __init__(self, directory) -> None:
        self.root, self.handle = Path(directory), None
        self.handle = on_rank0(self._acquire, default=None)

    def _acquire(self):
        root = self.root
        if root.exists() and not root.is_dir():
            raise InvalidInputError(f"--checkpoint-dir {root} exists and is not a directory")
        if (root / LOCK_FILE).is_symlink():
            raise InvalidInputError(f"{root / LOCK_FILE} is a symbolic link; autoplan does not write through links")
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.mkdir()
            probe.rmdir()
            # never through a link: O_NOFOLLOW (a link named .autoplan.lock is refused, its target untouched)
            handle = os.fdopen(os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as err:
            raise InvalidInputError(f"checkpoint folder {root} is not writable: {err.strerror or err}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise InvalidInputError(f"checkpoint folder {root} is in use by another run ({holder}); one run per "
                                    "folder") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        return handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------- collectives
def on_rank0(function, default=None):
    """function() on rank 0 (collective): its result on every rank when it is plain data (else `default` on
    the other ranks). An InvalidInputError or OSError there is raised on every rank as InvalidInputError
    with the same message, any other error as RuntimeError: no rank is left waiting for rank 0."""
    result, error = default, None
    if _rank() == 0:
        try:
            result = function()
        except InvalidInputError as err:
            error = ("input", str(err))
        except OSError as err:
            error = ("input", f"{getattr(err, 'filename', '') or ''}: {err.strerror or err}".lstrip(": "))
        except Exception as err:
            if not dist.is_initialized():
                raise
            error = ("internal", first_line(err))
    if dist.is_initialized():
        shared = [error, result if _rank() == 0 and _shareable(result) else None]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
        if _rank() != 0:
            result = shared[1] if shared[1] is not None else default
    if error is not None:
        raise (InvalidInputError if error[0] == "input" else RuntimeError)(error[1])
    return result


def agree(error: str | None) -> None:
    """Raise on every rank the first rank's error, if any rank has one (collective)."""
    errors = _gather(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise InvalidInputError(first)


def _shareable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, tuple, list, dict, Path))


def _gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
