"""autoplan's file I/O at the trust boundary: the user's data files in, autoplan's outputs out.

Plans, clusters, profiles and bench results are data: read as bounded UTF-8 JSON (no NaN or Infinity,
no nesting deep enough to exhaust the parser), never a path to code. Outputs are written atomically (a
temp file in the target's folder, then a rename), never through a symbolic link, and an existing file is
replaced only when the caller says so (the CLI's `--force`). Every failure is an InvalidInputError in one
line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from autoplan.errors import InvalidInputError

MAX_INPUT_BYTES = 256 * 2**20  # a measured cluster file with raw samples is a few MB; a plan, a few KB


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of a regular file of at most MAX_INPUT_BYTES, or InvalidInputError in one line."""
    path = Path(path)
    try:
        if not path.is_file():
            raise InvalidInputError(f"{what} not found: {path}")
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise InvalidInputError(f"{path}: {size:,} bytes, more than the {MAX_INPUT_BYTES:,} a {what} may have")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"{path}: not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x})") from None
    except OSError as err:
        raise InvalidInputError(f"{path}: cannot be read: {err.strerror or err}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number autoplan accepts")


def parse_json(text: str, source: str) -> object:
    """JSON text as Python values, refusing NaN/Infinity and nesting past the parser's recursion limit."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"{source} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except ValueError as err:
        raise InvalidInputError(f"{source}: {err}") from None
    except RecursionError:
        raise InvalidInputError(f"{source}: JSON nested too deeply") from None


def read_json(path: str | Path, what: str = "file") -> object:
    return parse_json(read_text(path, what), str(path))


def check_output(path: str | Path, *, force: bool = False) -> Path:
    """`path` if autoplan may write a file there: not a symbolic link, not a directory, not an existing
    file unless `force`, in a folder that exists and is writable."""
    path = Path(path)
    if path.is_symlink():
        raise InvalidInputError(f"{path} is a symbolic link; autoplan does not write through links")
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory, not a file")
    if path.exists() and not force:
        raise InvalidInputError(f"{path} exists; pass --force to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise InvalidInputError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write {path}: folder {folder} is not writable")
    return path


def write_text(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Write `text` to `path` as UTF-8, atomically (write_bytes)."""
    return write_bytes(path, text.encode("utf-8"), force=force)


def write_bytes(path: str | Path, data: bytes, *, force: bool = False) -> Path:
    """Write `data` to `path` atomically (check_output first): readers see the old file or the new one,
    never a part; a link at `path` is refused (and the rename would replace the link, not its target)."""
    path = check_output(path, force=force)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise InvalidInputError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise InvalidInputError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
