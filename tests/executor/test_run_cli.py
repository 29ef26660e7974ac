"""`autoplan launch` / `autoplan run` end to end: torchrun, the plan, the metrics file."""

import json
import subprocess
import sys

from autoplan.cli import main


def test_launch_two_ranks_writes_metrics(tmp_path):
    """Oracle: the metrics contract: one JSON line per step (step, loss, step_time_s, tokens_per_s,
    max_memory_bytes), then a summary; the loss of the learnable synthetic stream falls."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"dp": 2, "zero_stage": 1, "global_batch_size": 8, "micro_batch_size": 4}))
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.run([sys.executable, "-m", "autoplan", "launch", "--nproc-per-node", "2", "gpt-tiny",
                           "--plan", str(plan), "--steps", "4", "--lr", "1e-2", "--metrics", str(metrics)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps, summary = lines[:-1], lines[-1]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert all({"loss", "step_time_s", "tokens_per_s", "max_memory_bytes"} <= s.keys() for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert summary["summary"] and summary["steps"] == 4 and summary["median_step_time_s"] > 0


def test_run_refuses_what_the_executor_cannot_do_yet(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"cp": 2, "ep": 2, "global_batch_size": 4}))
    assert main(["run", "moe-tiny", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "expert parallelism runs with cp=1 only" in err and err.count("\n") == 1
