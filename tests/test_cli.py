"""The CLI contract: results on stdout; bad input is one line on stderr with exit code 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from autoplan.schema import Estimate

PLAN = {"dp": 2, "tp": 2, "pp": 1, "zero_stage": 1, "micro_batch_size": 1, "global_batch_size": 8}




def test_estimate_prints_breakdowns(plan_file, run_cli):
    code, out, err = run_cli(["estimate", "gpt-tiny", "--plan", str(plan_file), "--gpus", "4", "--cluster", "dgx-a100-80gb"])
    assert code == 0, err
    for word in ("step time", "MFU", "tp_comm", "pp_bubble", "optimizer", "activations", "reserve", "fits"):
        assert word in out


def test_estimate_on_a_stack_prints_its_band(plan_file, run_cli):
    """--stack picks the software the plan runs on: a fused stack is faster on the same plan; the step time
    is printed with the band the published runs held (costmodel.bands); an unknown stack is one line, exit 2."""
    argv = ["estimate", "gpt-tiny", "--plan", str(plan_file), "--gpus", "4", "--json"]
    eager = Estimate.model_validate_json(run_cli(argv)[1])
    fused = Estimate.model_validate_json(run_cli(argv + ["--stack", "torch-compile"])[1])
    assert fused.step_time_s < eager.step_time_s
    code, out, _ = run_cli(argv[:-1])
    assert code == 0 and "published runs so predicted took" in out
    code, _, err = run_cli(argv + ["--stack", "nonesuch"])
    assert code == 2 and "unknown stack 'nonesuch'" in err and len(err.strip().splitlines()) == 1


def test_estimate_json_is_an_estimate(plan_file, run_cli):
    code, out, _ = run_cli(["estimate", "gpt-tiny", "--plan", str(plan_file), "--json"])
    assert code == 0
    est = Estimate.model_validate_json(out)
    assert est.step_time_s > 0 and est.fits


def test_plan_file_with_origin_wrapper_is_accepted(tmp_path, run_cli):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"plan": PLAN, "model": "gpt-tiny"}))
    assert run_cli(["estimate", "gpt-tiny", "--plan", str(path)])[0] == 0


def _bad_model_file(tmp_path, body):
    path = tmp_path / "model.py"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("unknown_preset", "unknown cluster preset 'dgx-z9'"),
    ("malformed_plan", "is not valid JSON"),
    ("tp_not_dividing_heads", "tp=3 does not divide 4 heads"),
    ("pp_above_layers", "exceeds the model's 4 layers"),
    ("ep_not_dividing_experts", "ep=3 does not divide 4 experts"),
    ("wrong_gpu_count", "but the cluster has 16 GPUs"),
    ("missing_model", "model file not found"),
    ("raising_model", "build_model() raised ZeroDivisionError"),
    ("no_build_model", "does not define build_model()"),
    ("unknown_model", "unknown model 'gpt-huge'"),
    ("missing_plan", "plan file not found"),
    ("bad_field", "micro_batch_size"),
    ("bad_flag", "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(case, expected, tmp_path, plan_file, run_cli):
    model, plan, extra = "gpt-tiny", str(plan_file), []
    if case == "unknown_preset":
        extra = ["--cluster", "dgx-z9"]
    elif case == "malformed_plan":
        (tmp_path / "bad.json").write_text("{dp: 2")
        plan = str(tmp_path / "bad.json")
    elif case in ("tp_not_dividing_heads", "pp_above_layers", "ep_not_dividing_experts", "bad_field"):
        fields = {"tp_not_dividing_heads": {"dp": 1, "tp": 3, "global_batch_size": 3},
                  "pp_above_layers": {"dp": 1, "pp": 8, "global_batch_size": 8},
                  "ep_not_dividing_experts": {"dp": 3, "ep": 3, "global_batch_size": 3},
                  "bad_field": {"dp": 2, "micro_batch_size": 3, "global_batch_size": 8}}[case]
        (tmp_path / "p.json").write_text(json.dumps(fields))
        plan = str(tmp_path / "p.json")
        model = "moe-tiny" if case == "ep_not_dividing_experts" else model
    elif case == "wrong_gpu_count":
        extra = ["--gpus", "16"]
    elif case == "missing_model":
        model = str(tmp_path / "nope.py")
    elif case == "raising_model":
        model = _bad_model_file(tmp_path, "def build_model():\n    return 1 / 0\n")
    elif case == "no_build_model":
        model = _bad_model_file(tmp_path, "x = 1\n")
    elif case == "unknown_model":
        model = "gpt-huge"
    elif case == "missing_plan":
        plan = str(tmp_path / "none.json")
    elif case == "bad_flag":
        extra = ["--frobnicate"]
    code, out, err = run_cli(["estimate", model, "--plan", plan, *extra])
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_has_no_traceback(tmp_path):
    """End to end through a real process: a model.py that raises at import."""
    model = _bad_model_file(tmp_path, "raise RuntimeError('boom')\n")
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    proc = subprocess.run([sys.executable, "-m", "autoplan", "estimate", model, "--plan", str(tmp_path / "plan.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"autoplan: error: {model} raised while importing: RuntimeError: boom"


def test_search_prints_table_and_writes_a_plan_file_estimate_accepts(tmp_path, run_cli):
    out = tmp_path / "plan.json"
    code, stdout, err = run_cli(["search", "gpt-tiny", "--gpus", "4", "--global-batch", "16", "--out", str(out)])
    assert code == 0, err
    for words in ("top plans", "expert defaults", "why the best plan wins", "proven lower bound", "MFU"):
        assert words in " ".join(stdout.split())  # the table wraps long lines at the terminal's width
    saved = json.loads(out.read_text())
    assert saved["model"] == "gpt-tiny" and saved["gpus"] == 4 and saved["estimate"]["fits"]
    code, stdout, err = run_cli(["estimate", "gpt-tiny", "--plan", str(out)])
    assert code == 0 and err == "" and "step time" in stdout
    code, _, err = run_cli(["estimate", "moe-tiny", "--plan", str(out)])
    assert code == 0 and "warning: " in err and "was made for gpt-tiny" in err


def test_search_json(run_cli):
    code, stdout, _ = run_cli(["search", "gpt-tiny", "--gpus", "2", "--global-batch", "8", "--top", "2", "--json"])
    assert code == 0
    data = json.loads(stdout)
    assert len(data["ranked"]) == 2 and data["best"] == data["ranked"][0]["plan"]
    assert data["lower_bound_s"] <= data["ranked"][0]["estimate"]["step_time_s"]


@pytest.mark.parametrize("gpus", [7, 96, 1000])
def test_odd_gpu_counts_get_a_plan(gpus, run_cli):
    """The default global batch suits any GPU count (its odd part times a power of two)."""
    code, stdout, err = run_cli(["search", "llama3-8b", "--gpus", str(gpus), "--top", "1"])
    assert code == 0, err
    assert "top plans" in stdout


def test_nothing_fits_exits_3_with_closest_plan(run_cli):
    code, _, err = run_cli(["search", "llama3-405b", "--gpus", "8"])
    assert code == 3
    assert "closest:" in err and "bytes over" in err and err.count("\n") == 1


def test_no_layout_exits_3(run_cli):
    code, _, err = run_cli(["search", "gpt-tiny", "--gpus", "7", "--global-batch", "3"])
    assert code == 3 and "no layout dp*tp*pp*cp = 7" in err


@pytest.mark.parametrize("argv, expected", [
    (["search", "gpt-tiny", "--gpus", "4", "--fix", "tp"], "--fix takes FIELD=VALUE"),
    (["search", "gpt-tiny", "--gpus", "0"], "--gpus must be between 1 and 1,048,576, got 0"),
    (["search", "gpt-tiny"], "the following arguments are required: --gpus"),
])
def test_search_bad_input(argv, expected, run_cli):
    code, _, err = run_cli(argv)
    assert code == 2 and expected in err and err.count("\n") == 1


@pytest.mark.parametrize("pattern, message", [("(", "is not a regular expression"),
                                              ("no_such_parameter", "matches none of the model's parameters")])
def test_trainable_bad_pattern_is_one_line(run_cli, pattern, message):
    code, _, err = run_cli(["search", "gpt-tiny", "--gpus", "2", "--trainable", pattern])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_trainable_shrinks_the_optimizer_states(run_cli, tmp_path):
    """Oracle: ZeRO's K = 12 B per trained parameter: training only the output head (gpt-tiny's: 512 x 64)
    keeps 12 B per head parameter of optimizer states, not 12 B per model parameter."""
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"global_batch_size": 8}))
    code, out, err = run_cli(["estimate", "gpt-tiny", "--plan", str(plan), "--json", "--trainable", r"^output\."])
    assert code == 0, err
    assert json.loads(out)["memory_breakdown"]["optimizer"] == pytest.approx(12 * 512 * 64, rel=0.01)
