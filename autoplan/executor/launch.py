"""`autoplan launch`: torchrun on this node, owned by the launcher, so that stopping the launcher stops
the job and a rank's refusal is what the launcher says.

- torchrun's agent runs inside the launcher's process (`torch.distributed.run`, not a child torchrun), so
  SIGTERM, SIGINT and SIGHUP to the launcher reach the agent's handlers, which stop every rank before the
  launcher exits (128 + the signal's number).
- Each rank asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG; a watchdog thread where
  there is no prctl): a launcher killed by SIGKILL, alone or with its process group, takes every rank with
  it, although torchrun starts ranks in sessions of their own. Under a plain torchrun the parent is torchrun.
- A rank under the launcher writes its one-line error to a folder the launcher gives it (ERROR_DIR_ENV)
  instead of printing it; the launcher prints the first failed rank's line once and exits with that rank's
  code, instead of torchrun's ChildFailedError traceback and exit 1.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ERROR_DIR_ENV = "AUTOPLAN_LAUNCH_ERROR_DIR"
LAUNCHER_PID_ENV = "AUTOPLAN_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# where torchrun's agent logs a failed rank (a logger's filters see only its own records, not its children's)
_AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api",
                  "torch.distributed.elastic.multiprocessing.errors.error_handler")


def launch(*, nproc_per_node: int, nnodes: str, rdzv_endpoint: str | None, max_restarts: int,
           run_args: list[str]) -> int:
    """Run `autoplan run RUN_ARGS` on `nproc_per_node` ranks under torchrun's agent in this process; the
    exit code (0, the first failed rank's code, or 128 + a signal that stopped the launcher)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    elif str(nnodes) == "1":  # a free port on this machine: several jobs (or test workers) side by side
        argv += ["--standalone"]
    argv += ["-m", "autoplan", "run", *run_args]
    quiet = _QuietFailures()
    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    with tempfile.TemporaryDirectory(prefix="autoplan-launch-") as errors:
        saved = {key: os.environ.get(key) for key in (ERROR_DIR_ENV, LAUNCHER_PID_ENV)}
        os.environ.update({ERROR_DIR_ENV: errors, LAUNCHER_PID_ENV: str(os.getpid())})
        try:
            torchrun.run(torchrun.parse_args(argv))
            return 0
        except ChildFailedError as err:
            line, code = failure_line(err.failures, Path(errors))
            print(line, file=sys.stderr)
            return code
        except SignalException as err:
            print(f"autoplan: stopped by {signal.Signals(err.sigval).name}: every rank was stopped", file=sys.stderr)
            return 128 + int(err.sigval)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            for name in _AGENT_LOGGERS:
                logging.getLogger(name).removeFilter(quiet)


def failure_line(failures: dict, errors: Path) -> tuple[str, int]:
    """(the line to print, the exit code) for torchrun's {rank: ProcessFailure}: of the ranks that exited by
    themselves (not stopped by the agent's SIGTERM after the first failure, which may catch a rank that has
    written its line but not yet exited) the lowest that wrote an error line, else the lowest; a rank killed
    by signal N exits 128 + N."""
    exited = {rank for rank, failure in failures.items() if failure.exitcode > 0}
    candidates = exited or set(failures)
    written = {rank: errors / f"rank_{rank}" for rank in candidates if (errors / f"rank_{rank}").is_file()}
    rank = min(written or candidates)
    code = failures[rank].exitcode
    if rank in written:
        line = written[rank].read_text(errors="replace").strip().splitlines()[0]
    elif code < 0:
        line = f"autoplan: error: rank {rank} was killed by {signal.Signals(-code).name}"
    else:
        line = f"autoplan: error: rank {rank} exited with code {code} (its output is above)"
    return line, code if code > 0 else 128 - code


class _QuietFailures(logging.Filter):
    """Drops the agent's multi-line failure reports (the launcher prints one line instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def report_rank_error(line: str) -> bool:
    """Under the launcher, hand this rank's error line to it (True); else False (print it yourself)."""
    folder, rank = os.environ.get(ERROR_DIR_ENV), os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return False
    (Path(folder) / f"rank_{rank}").write_text(line + "\n")
    return True


def die_with_parent() -> None:
    """Under torchrun (RANK set): be killed when the parent (the launcher's agent, or torchrun) dies."""
    if "RANK" not in os.environ:
        return
    parent = int(os.environ.get(LAUNCHER_PID_ENV) or os.getppid())
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl (not Linux)
        armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="autoplan-parent-watch").start()
    if os.getppid() != parent:  # the parent died before the kernel was asked
        os.kill(os.getpid(), signal.SIGKILL)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
