"""`autoplan launch` owns its job (executor.launch): killing the launcher (SIGTERM, SIGINT, SIGKILL, or
SIGKILL to its process group) stops every rank within seconds and leaves the last complete checkpoint
loadable and the folder free for the next run; a rank's refusal is one line and the rank's exit code."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from types import SimpleNamespace

import pytest

from autoplan.executor.checkpoint import latest_checkpoint
from autoplan.executor.checkpoint_files import FolderLock
from autoplan.executor.launch import failure_line

PLAN = {"dp": 2, "global_batch_size": 4, "micro_batch_size": 2}


def _launch(tmp_path: Path, mark: str, *run_args: str) -> subprocess.Popen:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    return subprocess.Popen([sys.executable, "-m", "autoplan", "launch", "--nproc-per-node", "2", "gpt-tiny",
                             "--plan", str(plan), *run_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "AUTOPLAN_TEST_MARK": mark})


def _ranks(mark: str) -> set[int]:
    """Live processes started for this test (the marker in their environment) that torchrun made ranks."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"AUTOPLAN_TEST_MARK={mark}".encode() in env and any(v.startswith(b"RANK=") for v in env) and state != "Z":
            found.add(int(entry.name))
    return found


def _wait(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.parametrize("how", ["SIGTERM to the launcher", "SIGINT to the launcher", "SIGKILL to the launcher"])
def test_killing_the_launcher_stops_every_rank(how, tmp_path):
    """Oracle: /proc: no process of the job's ranks is left 20 s after the signal (before, torchrun and the
    ranks trained on to the last step); the newest checkpoint is complete and the folder's lock is free.
    SIGKILL to the launcher's process group: test_one_run_per_folder_and_an_immediate_resume_after_a_kill."""
    mark, checkpoints, metrics = uuid.uuid4().hex, tmp_path / "ck", tmp_path / "metrics.jsonl"
    job = _launch(tmp_path, mark, "--steps", "100000", "--metrics", str(metrics), "--checkpoint-dir",
                  str(checkpoints), "--checkpoint-every", "2")
    try:
        assert _wait(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 180), job.stderr
        assert len(_ranks(mark)) == 2
        job.send_signal(getattr(signal, how.split()[0]))
        assert _wait(lambda: not _ranks(mark), 20), f"ranks left: {_ranks(mark)}"
        code = job.wait(timeout=30)
    finally:
        for pid in _ranks(mark):
            os.kill(pid, signal.SIGKILL)
        if job.poll() is None:
            job.kill()
    expected = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}.get(how.split()[0], -signal.SIGKILL)
    assert code == expected
    if code > 0:
        assert job.stderr.read().strip().splitlines()[-1].startswith(f"autoplan: stopped by {how.split()[0]}")
    assert latest_checkpoint(checkpoints) is not None
    FolderLock(checkpoints).release()


def test_one_run_per_folder_and_an_immediate_resume_after_a_kill(tmp_path):
    """Oracle: the folder's lock. A second job into the busy folder is refused in one line (exit 2) and
    changes no checkpoint, the first trains on; right after SIGKILL to the first job's group a resume is
    not refused (before: it trained beside the orphaned ranks into the same folder) and goes on from the
    newest checkpoint."""
    mark, checkpoints, metrics = uuid.uuid4().hex, tmp_path / "ck", tmp_path / "metrics.jsonl"
    first = _launch(tmp_path, mark, "--steps", "100000", "--metrics", str(metrics), "--checkpoint-dir",
                    str(checkpoints), "--checkpoint-every", "2")
    try:
        assert _wait(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 180)
        second = _launch(tmp_path, uuid.uuid4().hex, "--steps", "100000", "--checkpoint-dir", str(checkpoints))
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2 and err.count("autoplan: error:") == 1, err
        assert "is in use by another run" in err and "Traceback" not in err
        assert first.poll() is None  # the first job trains on
        os.killpg(first.pid, signal.SIGKILL)
        assert _wait(lambda: not _ranks(mark), 20)
    finally:
        for pid in _ranks(mark):
            os.kill(pid, signal.SIGKILL)
        if first.poll() is None:
            first.kill()
    newest = int(latest_checkpoint(checkpoints).name.removeprefix("step_"))
    resume = _launch(tmp_path, uuid.uuid4().hex, "--steps", str(newest + 2), "--checkpoint-dir", str(checkpoints))
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err
    assert f"resumed from {checkpoints / f'step_{newest}'}" in out
    assert latest_checkpoint(checkpoints).name == f"step_{newest + 1}"


def test_a_rank_refusal_is_one_line_and_its_exit_code(tmp_path):
    """Oracle: every rank refuses a step_5 without meta.json (exit 2); the launcher says so once, exits 2,
    and prints no traceback (before: torchrun's ChildFailedError and exit 1)."""
    (tmp_path / "ck" / "step_5").mkdir(parents=True)
    job = _launch(tmp_path, uuid.uuid4().hex, "--steps", "2", "--checkpoint-dir", str(tmp_path / "ck"))
    _, err = job.communicate(timeout=300)
    assert job.returncode == 2
    assert err.count("autoplan: error:") == 1 and "step_5 has no meta.json" in err
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".autoplan.lock", "step_5"]


def test_failure_line_prefers_a_rank_that_exited_by_itself(tmp_path):
    """Oracle: the race seen under load: rank 0 wrote its refusal but was still exiting when rank 1 exited
    with 2 and the agent sent rank 0 SIGTERM (-15): the launcher exits 2, not 143, with the refusal."""
    (tmp_path / "rank_0").write_text("autoplan: error: refused on rank 0\n")
    (tmp_path / "rank_1").write_text("autoplan: error: refused on rank 1\n")
    failures = {0: SimpleNamespace(exitcode=-signal.SIGTERM), 1: SimpleNamespace(exitcode=2)}
    assert failure_line(failures, tmp_path) == ("autoplan: error: refused on rank 1", 2)
    failures = {0: SimpleNamespace(exitcode=2), 1: SimpleNamespace(exitcode=2)}
    assert failure_line(failures, tmp_path) == ("autoplan: error: refused on rank 0", 2)
    killed = {1: SimpleNamespace(exitcode=-signal.SIGKILL)}
    assert failure_line(killed, tmp_path / "absent") == ("autoplan: error: rank 1 was killed by SIGKILL", 137)
