"""benchmarks/gpu_one.py end to end on CPU (the GPU report's code path, on gpt-tiny): what it measures is
what the executor ran, and the report's errors are computed from those numbers."""

import json

import pytest

from benchmarks import gpu_one


@pytest.mark.slow
def test_measure_then_report(tmp_path):
    out = tmp_path / "measured"
    assert gpu_one.main(["measure", "--out", str(out), "--models", "gpt-tiny", "--micro-batches", "2",
                         "--recompute", "none,full", "--global-batch", "4", "--seq-len", "64", "--steps", "3",
                         "--repeat", "2", "--no-profile"]) == 0
    measured = json.loads((out / "measured.json").read_text())
    assert len(measured["runs"]) == 4
    for run in measured["runs"]:
        assert len(run["losses"]) == 3 and run["median_step_time_s"] > 0
    # the same plan from the same seed trains the same losses
    assert measured["runs"][0]["losses"] == pytest.approx(measured["runs"][1]["losses"])
    assert gpu_one.main(["report", str(out), "--tag", "cpu-test", "--cluster", "dgx-h100", "--no-dry-run",
                         "--noise", str(out), "--results", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_one_cpu-test.json").read_text())
    row = report["rows"][0]
    assert row["measured_s"] == measured["runs"][0]["median_step_time_s"]
    assert report["summaries"]["preset"]["plans"] == 4
    assert report["noise"]["rows"] and all(r["runs"] == 2 for r in report["noise"]["rows"])
    assert "Noise floor" in (tmp_path / "gpu_one_cpu-test.md").read_text()
