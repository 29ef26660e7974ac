"""`autoplan launch` / `autoplan run` end to end: torchrun, the plan, the metrics file."""

import json
import subprocess
import sys

import pytest

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


def test_two_launches_side_by_side(tmp_path):
    """Two single-node jobs on one machine at once both run (each rendezvous takes a free port; a fixed
    default port made the second fail, seen as a flaky test under parallel workers)."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"dp": 2, "global_batch_size": 4, "micro_batch_size": 2}))
    jobs = [subprocess.Popen([sys.executable, "-m", "autoplan", "launch", "--nproc-per-node", "2", "gpt-tiny",
                              "--plan", str(plan), "--steps", "2", "--metrics", str(tmp_path / f"m{i}.jsonl")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]
    for i in range(2):
        assert len((tmp_path / f"m{i}.jsonl").read_text().splitlines()) == 3  # 2 steps and the summary


def test_run_refuses_what_the_executor_cannot_do_yet(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pp": 2, "schedule": "zero-bubble", "recompute": "selective", "global_batch_size": 4}))
    assert main(["run", "moe-tiny", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "zero-bubble schedule with selective recompute is not supported" in err and err.count("\n") == 1


def test_moe_with_ep_not_dividing_the_folded_ranks_refused_before_any_mesh(tmp_path, capsys):
    """Oracle: ep must divide dp*cp*tp (the ranks it folds over); the refusal comes in one line before a mesh
    is built (a bad expert mesh once surfaced as an internal ZeroDivisionError)."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tp": 2, "ep": 4, "zero_stage": 2, "sequence_parallel": True, "global_batch_size": 4}))
    assert main(["run", "moe-tiny", "--plan", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "ep=4 does not divide" in err and err.count("\n") == 1


def test_search_keeps_to_plans_the_executor_runs_unless_asked(capsys):
    """Oracle: autoplan.support.unsupported_reason is None for every ranked plan of `search` (and of the old
    `--executable`); with `--any` the top plans of deepseek-tiny on 2 GPUs include ones it refuses (zero-bubble
    with selective recompute), each marked not runnable with the executor's reason."""
    from autoplan.support import unsupported_reason
    from autoplan.schema import Plan

    def ranked(*extra):
        assert main(["search", "deepseek-tiny", "--gpus", "2", "--global-batch", "16", "--top", "300", "--json",
                     *extra]) == 0
        return [(Plan.model_validate(row["plan"]), row) for row in json.loads(capsys.readouterr().out)["ranked"]]

    refused = lambda plan: unsupported_reason(plan, moe=True)  # noqa: E731
    for extra in ((), ("--executable",)):
        assert all(refused(plan) is None and row["runnable"] for plan, row in ranked(*extra))
    rows = ranked("--any")
    assert any(refused(plan) for plan, _ in rows)
    assert all(row["runnable"] == (refused(plan) is None) and row["refusal"] == refused(plan) for plan, row in rows)


def test_bf16_parameters_train_with_fp32_master_weights():
    """Oracle: the fp32 run of the same model, seed and data: bf16 parameters with the fp32-master AdamW
    (what `autoplan run` does on GPUs) stay within bf16 rounding (1e-2 relative) of its losses, and the
    optimizer holds fp32 master copies."""
    import torch

    from autoplan.executor import apply
    from autoplan.executor.precision import MasterWeightAdamW
    from autoplan.executor.train import make_optimizer, train_step
    from autoplan.models import build_named
    from autoplan.schema import Plan

    def losses(dtype):
        model = build_named("gpt-tiny")
        model.init_weights(seed=0)
        par = apply(model.to(dtype), Plan(global_batch_size=4, micro_batch_size=2))
        optimizer = make_optimizer(par, lr=1e-2)
        run = [train_step(par, optimizer, step, seq_len=64, vocab=512, device=torch.device("cpu")) for step in range(3)]
        return run, optimizer

    reference, _ = losses(torch.float32)
    mixed, optimizer = losses(torch.bfloat16)
    assert isinstance(optimizer, MasterWeightAdamW)
    assert mixed == pytest.approx(reference, rel=1e-2)
