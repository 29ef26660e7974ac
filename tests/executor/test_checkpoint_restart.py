"""A rank killed mid-run: torchrun restarts the job (--max-restarts 1), it resumes from the last checkpoint
and reproduces the loss curve of the uninterrupted run.
The restarted ranks find each other through torchrun's store under a prefix of their attempt
(executor.train._restart_safe_store): without it they are handed the dead ranks' addresses and hang."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autoplan.schema import Plan
from dist_worker import free_port

SCRIPT = Path(__file__).with_name("crash_run.py")
STEPS, EVERY, KILL_AT = 8, 2, 5  # checkpoints after steps 1, 3 (5 is never reached by the first attempt)


def _torchrun(tmp_path: Path, name: str, kill_at: int) -> subprocess.CompletedProcess:
    plan = tmp_path / "plan.json"
    plan.write_text(Plan(dp=2, zero_stage=3, global_batch_size=8, micro_batch_size=2).model_dump_json())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(SCRIPT), str(kill_at), "1",
               "gpt-tiny", "--plan", str(plan), "--steps", str(STEPS), "--lr", "1e-2",
               "--metrics", str(tmp_path / f"{name}.jsonl"), "--checkpoint-dir", str(tmp_path / name),
               "--checkpoint-every", str(EVERY)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(path: Path) -> dict[int, float]:
    """step -> loss; for a step run twice (before the kill and after the restart), the restarted one."""
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "step" in r}


def test_killed_rank_resumes_and_reproduces_the_loss_curve(tmp_path):
    """Oracle: the uninterrupted run of the same plan, seed and data on the same 2 ranks."""
    _torchrun(tmp_path, "clean", kill_at=-1)
    crashed = _torchrun(tmp_path, "crashed", kill_at=KILL_AT)
    assert "resumed from" in crashed.stdout and "step_3" in crashed.stdout  # it did restart, from step 3
    clean, resumed = _losses(tmp_path / "clean.jsonl"), _losses(tmp_path / "crashed.jsonl")
    assert sorted(resumed) == list(range(STEPS))
    assert [resumed[s] for s in range(STEPS)] == pytest.approx([clean[s] for s in range(STEPS)], rel=1e-5)
    summaries = [r for r in map(json.loads, (tmp_path / "crashed.jsonl").read_text().splitlines()) if "summary" in r]
    assert summaries[-1]["first_step"] == 4
    assert sorted(p.name for p in (tmp_path / "crashed").iterdir()) == [".autoplan.lock", "step_5", "step_7"]  # keep 2, no .tmp
