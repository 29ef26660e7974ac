"""`autoplan run` under torchrun, with one rank killed (SIGKILL) in the middle of step KILL_AT_STEP of the
first attempt: what a dying GPU or node looks like to the job. torchrun (--max-restarts) then restarts every
rank, and the run must go on from its last checkpoint.

Usage (by test_checkpoint_restart): torchrun ... crash_run.py KILL_AT_STEP KILLED_RANK <autoplan run arguments>
"""

import importlib
import os
import signal
import sys

from autoplan.cli import main

train_module = importlib.import_module("autoplan.executor.train")  # the package re-exports train()

kill_at, killed_rank, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
step_function = train_module.train_step


def dying_step(par, optimizer, step, **kwargs):
    if first_attempt and step == kill_at and int(os.environ["RANK"]) == killed_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    return step_function(par, optimizer, step, **kwargs)


train_module.train_step = dying_step
sys.exit(main(["run", *argv]))
