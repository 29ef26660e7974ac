"""Bad input, tried as a hostile or careless user would: every case ends in seconds with one line on stderr
and the promised exit code (2: bad input), changes no file of the user's, and runs no code the user did
not name as code. Oracle for each case: the CLI contract (DESIGN.md: exit codes, one line, no traceback)."""

import json
import os
import time
from pathlib import Path

import pytest

from autoplan.schema import PRESETS_DIR

PLAN = {"dp": 2, "global_batch_size": 8, "micro_batch_size": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def _refused(run_cli, argv: list[str], expected: str, root: Path, code: int = 2) -> None:
    """`autoplan ARGV` exits `code` within 20 s with one stderr line holding `expected`; root's files unchanged."""
    before = _files(root)
    start = time.perf_counter()
    got, out, err = run_cli(argv)
    assert (got, expected in err, err.count("\n")) == (code, True, 1), (got, err, out)
    assert "Traceback" not in err and "internal error" not in err
    assert time.perf_counter() - start < 20
    assert _files(root) == before


@pytest.fixture
def plan(tmp_path) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN))
    return str(path)


def _cluster(tmp_path: Path, **changes) -> str:
    data = json.loads((PRESETS_DIR / "dgx-h100.json").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        target[key] = value
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(data))  # json writes inf/nan as Infinity/NaN
    return str(path)


SEARCH = ["search", "gpt-tiny", "--gpus", "8"]


@pytest.mark.parametrize("argv, expected", [
    (["search", "gpt-tiny", "--gpus", str(10**30)], "--gpus must be between 1 and 1,048,576"),
    (["search", "gpt-tiny", "--gpus", str(2**61 - 1)], "--gpus must be between 1 and 1,048,576"),
    (SEARCH + ["--global-batch", str(10**20)], "--global-batch must be between 1 and"),
    (SEARCH + ["--global-batch", "0"], "--global-batch must be between 1 and"),  # was: silently 512
    (SEARCH + ["--top", "0"], "--top must be between 1 and"),
    (SEARCH + ["--seq-len", str(10**12)], "--seq-len must be between 1 and"),
    (SEARCH + ["--fix", "schema_version=9"], "--fix takes FIELD=VALUE with a plan field"),
    (SEARCH + ["--fix", "global_batch_size=8"], "--fix takes FIELD=VALUE with a plan field"),
    (SEARCH + ["--fix", "sequence_parallel=yes"], "--fix sequence_parallel=yes: expected true or false"),
    (SEARCH + ["--fix", "tp=abc"], "--fix tp=abc: expected a whole number"),   # was: exit 3, negative bytes
    (SEARCH + ["--fix", "tp=-1"], "--fix tp=-1: expected a whole number"),
    (SEARCH + ["--fix", "tp=²"], "--fix tp=²: expected a whole number"),     # was: internal error
    (SEARCH + ["--fix", "tp=0"], "--fix tp=0: Input should be greater than or equal to 1"),
    (SEARCH + ["--fix", "zero_stage=7"], "--fix zero_stage=7: Input should be less than or equal to 3"),
    (SEARCH + ["--fix", "recompute=sometimes"], "--fix recompute=sometimes: Input should be 'none', 'selective'"),
    (SEARCH + ["--fix", "schedule=fast"], "--fix schedule=fast: Input should be 'gpipe'"),
])
def test_bad_arguments(argv, expected, run_cli, tmp_path):
    _refused(run_cli, argv, expected, tmp_path)


@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_run_refuses_a_learning_rate_that_is_not_positive_and_finite(lr, plan, run_cli, tmp_path):
    _refused(run_cli, ["run", "gpt-tiny", "--plan", plan, "--lr", lr], "--lr must be a positive, finite number",
             tmp_path)


@pytest.mark.parametrize("flops", ["nan", "-1", "inf"])
def test_profile_refuses_a_peak_that_is_not_positive_and_finite(flops, run_cli, tmp_path):
    """Oracle: refused before any measurement (was: an internal error after the whole profile run)."""
    _refused(run_cli, ["profile", "--quick", "--peak-flops", flops, "--out", str(tmp_path / "c.json")],
             "--peak-flops must be a positive, finite number", tmp_path)


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe{\x00", "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    (b'{"dp": NaN, "global_batch_size": 8}', "NaN is not a number autoplan accepts"),
    (b'{"global_batch_size": Infinity}', "Infinity is not a number autoplan accepts"),
    (b'{"global_batch_size": 8, "schema_version": 9}', "schema_version 9: this autoplan reads version 1"),
    (b'{"global_batch_size": 100000000000000000000}', "global_batch_size"),
    (b"", "is not valid JSON"),
])
def test_bad_plan_files(content, expected, run_cli, tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    _refused(run_cli, ["estimate", "gpt-tiny", "--plan", str(path)], expected, tmp_path)


@pytest.mark.parametrize("changes, expected", [
    ({"intra_node__bandwidth_bytes_per_s": float("inf")}, "Infinity is not a number autoplan accepts"),
    ({"peak_flops_per_s": float("nan")}, "NaN is not a number autoplan accepts"),
    ({"peak_flops_per_s": 1e400}, "Infinity is not a number"),  # 1e400 parses as inf
    ({"gemm_efficiency": []}, "gemm_efficiency: List should have at least 1 item"),
    ({"overheads": {"loop": -1e-3}}, "overhead loop = -0.001 s: must be a finite number of seconds >= 0"),
    ({"memory_bytes": -5}, "memory_bytes: Input should be greater than 0"),
    ({"num_gpus": 2**40}, "num_gpus: Input should be less than or equal to 1048576"),
])
def test_bad_cluster_files(changes, expected, run_cli, tmp_path):
    cluster = _cluster(tmp_path, **changes)
    _refused(run_cli, SEARCH + ["--cluster", cluster], expected, tmp_path)


@pytest.mark.parametrize("body, expected", [
    ("import sys\nsys.exit(7)\n", "called sys.exit(7) while importing"),       # was: exit 7, no message
    ("import sys\ndef build_model():\n    sys.exit(7)\n", "build_model() called sys.exit(7)"),
    ("CONFIG = 5\ndef build_model():\n    pass\n", "CONFIG must be a dict"),    # was: internal error
    ("CONFIG = {'seq_len': 'long'}\nfrom autoplan.models import build_named\n"
     "def build_model():\n    return build_named('gpt-tiny')\n", "seq_len must be a whole number"),
])
def test_bad_model_files(body, expected, run_cli, tmp_path):
    model = tmp_path / "model.py"
    model.write_text(body)
    _refused(run_cli, ["search", str(model), "--gpus", "8"], expected, tmp_path)


# ---- outputs: never through a link, never over a file without --force, one line for a folder that is not there

def test_out_in_a_missing_or_unwritable_folder(run_cli, tmp_path):
    _refused(run_cli, SEARCH + ["--out", str(tmp_path / "absent" / "plan.json")], "folder", tmp_path)
    _refused(run_cli, SEARCH + ["--out", "/proc/plan.json"], "cannot write /proc/plan.json", tmp_path)


def test_out_over_an_existing_file_needs_force(run_cli, tmp_path):
    """Oracle: the file's bytes: kept when refused; a plan file `estimate` reads after --force."""
    out = tmp_path / "plan.json"
    out.write_text("my notes")
    _refused(run_cli, SEARCH + ["--out", str(out)], "exists; pass --force to replace it", tmp_path)
    code, _, err = run_cli(SEARCH + ["--out", str(out), "--force"])
    assert code == 0, err
    assert run_cli(["estimate", "gpt-tiny", "--plan", str(out)])[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left beside it


def test_out_never_writes_through_a_symlink(run_cli, tmp_path):
    """Oracle: the link's target keeps its bytes, even with --force (before: the target was overwritten)."""
    target, link = tmp_path / "precious.txt", tmp_path / "plan.json"
    target.write_text("precious")
    link.symlink_to(target)
    for extra in ([], ["--force"]):
        _refused(run_cli, SEARCH + ["--out", str(link), *extra], "is a symbolic link", tmp_path)


def test_bench_report_is_not_written_over_a_link(run_cli, tmp_path):
    """Oracle: refused before any plan runs (no runs/ folder), the link and its target unchanged."""
    out, target = tmp_path / "bench", tmp_path / "precious.md"
    out.mkdir()
    target.write_text("precious")
    (out / "report.md").symlink_to(target)
    _refused(run_cli, ["bench", "gpt-tiny", "--gpus", "1", "--out", str(out), "--force"], "is a symbolic link",
             tmp_path)
    _refused(run_cli, ["bench", "gpt-tiny", "--gpus", "1", "--out", str(out), "--global-batch", "0"],
             "--global-batch must be between", tmp_path)


def test_bench_out_that_cannot_be_made(run_cli, tmp_path):
    _refused(run_cli, ["bench", "gpt-tiny", "--gpus", "1", "--out", "/proc/autoplan-bench"], "cannot create --out",
             tmp_path)


def test_profile_model_out_needs_force(run_cli, tmp_path):
    out = tmp_path / "profile.json"
    out.write_text("mine")
    _refused(run_cli, ["profile-model", "gpt-tiny", "--out", str(out)], "exists; pass --force", tmp_path)


# ---- calibrate: results are data; a model file they name is not imported unless named on the command line

def _results(tmp_path: Path, model: str, seconds) -> str:
    path = tmp_path / "results.json"
    rows = [{"plan": {"global_batch_size": 8, "micro_batch_size": mbs}, "measured_step_time_s": seconds,
             "status": "ok"} for mbs in (1, 2, 4)]
    path.write_text(json.dumps({"model": model, "seq_len": 64, "plans": rows}))
    return str(path)


def test_calibrate_imports_no_model_file_named_by_results(run_cli, tmp_path):
    """Oracle: a marker the model file would write on import is absent; naming the file with --model is the
    user's say-so, and then it is imported (the marker appears)."""
    marker = tmp_path / "imported"
    model = tmp_path / "model.py"
    model.write_text(f"open({str(marker)!r}, 'w').close()\nCONFIG = {{'seq_len': 64, 'vocab': 512}}\n"
                     "from autoplan.models import build_named\ndef build_model():\n    return build_named('gpt-tiny')\n")
    results = _results(tmp_path, str(model), 0.1)
    argv = ["calibrate", results, "--cluster", "dgx-h100", "--out", str(tmp_path / "fitted.json")]
    _refused(run_cli, argv, "calibrate imports model code only when it is named on the command line", tmp_path)
    assert not marker.exists()
    code, _, err = run_cli(argv + ["--model", str(model)])
    assert code == 0, err
    assert marker.exists() and (tmp_path / "fitted.json").is_file()


@pytest.mark.parametrize("seconds", [-0.5, 0, "fast", None, True])
def test_calibrate_refuses_times_that_are_not_positive_seconds(seconds, run_cli, tmp_path):
    results = _results(tmp_path, "gpt-tiny", seconds)
    _refused(run_cli, ["calibrate", results, "--cluster", "dgx-h100", "--out", str(tmp_path / "fitted.json")],
             "must be a positive, finite number of seconds", tmp_path)
