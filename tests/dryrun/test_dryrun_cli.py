"""`autoplan dryrun` and `autoplan search --verify`: results on stdout, bad input one line with exit code 2."""

import json

import pytest

from autoplan.schema import DryRunResult, Plan

PLAN = {"dp": 2, "tp": 2, "zero_stage": 3, "sequence_parallel": True, "micro_batch_size": 2, "global_batch_size": 8}




def test_dryrun_prints_the_breakdown_beside_the_estimate(plan_file, run_cli):
    code, out, err = run_cli(["dryrun", "gpt-tiny", "--plan", str(plan_file), "--gpus", "4"])
    assert code == 0, err
    for word in ("params", "grads", "optimizer", "activations", "temporaries", "buffers", "reserve", "dry run",
                 "estimate", "fits"):
        assert word in out


def test_dryrun_json_is_a_dry_run_result(plan_file, run_cli):
    code, out, err = run_cli(["dryrun", "gpt-tiny", "--plan", str(plan_file), "--json"])
    assert code == 0, err
    result = DryRunResult.model_validate_json(out)
    assert result.plan == Plan(**PLAN) and result.gpus == 4
    assert result.peak_memory_bytes == sum(result.memory_breakdown.values())


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "8"], "--gpus 8 but the plan's dp*tp*pp*cp is 4"),
    (["--stages", "some"], "invalid choice"),
])
def test_dryrun_bad_input_is_one_line(plan_file, run_cli, argv, message):
    code, out, err = run_cli(["dryrun", "gpt-tiny", "--plan", str(plan_file), *argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_dryrun_of_a_plan_the_executor_refuses_is_one_line(tmp_path, run_cli):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"pp": 2, "dp": 2, "zero_stage": 3, "schedule": "zero-bubble", "global_batch_size": 8}))
    code, out, err = run_cli(["dryrun", "moe-tiny", "--plan", str(path)])
    assert code == 2 and "zero-bubble schedule with ZeRO-3" in err and len(err.strip().splitlines()) == 1


def test_search_verify_dry_runs_the_ranked_plans(run_cli):
    code, out, err = run_cli(["search", "gpt-tiny", "--gpus", "2", "--top", "2", "--verify", "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["verification"][0].startswith("verified 2 plans by dry run")
    assert all("measured" in line for line in data["verification"][1:])


def test_dryrun_time_prints_the_step_beside_the_estimate(plan_file, run_cli):
    code, out, err = run_cli(["dryrun", "gpt-tiny", "--plan", str(plan_file), "--time"])
    assert code == 0, err
    assert "step time on dgx-h100" in out and "tp_comm" in out and "dp_comm_exposed" in out


def test_dryrun_time_json_has_the_step_and_its_breakdown(plan_file, run_cli):
    code, out, err = run_cli(["dryrun", "gpt-tiny", "--plan", str(plan_file), "--time", "--json"])
    assert code == 0, err
    result = DryRunResult.model_validate_json(out)
    assert result.step_time_s > 0 and result.cluster == "dgx-h100"
    assert sum(result.time_breakdown.values()) == pytest.approx(result.step_time_s)
    assert result.time_breakdown["tp_comm"] > 0 and result.time_breakdown["dp_comm_exposed"] >= 0
