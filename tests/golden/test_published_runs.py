"""Golden: published training runs, as benchmarks/published_runs.py estimates them.

The benchmark's cross-validated report is the measure of the model (benchmarks/results/published_runs.md);
these tests hold the shipped presets and bands to that report, check that every published configuration
maps to a plan, and keep a few runs reproduced within a stated tolerance so a change to the cost model that
breaks them shows up in the suite, not only when the benchmark is re-run."""

import json

import pytest

import autoplan as ap
from autoplan.costmodel.bands import BANDS_FILE
from benchmarks.published_cases import cases, profile_case
from benchmarks.published_runs import RESULTS, family, memory_model

REPORT = json.loads((RESULTS / "published_runs.json").read_text())
ALL = cases()
KORTHIKANTI = [c for c in ALL if c.source == "korthikanti-2022" and not c.skipped]
TOLERANCE = 0.15


def test_every_throughput_run_maps_to_a_plan():
    """Oracle: the data files: every run with a published step time becomes a valid plan on a preset
    cluster of its GPU count; only per-layer timings and memory figures are left out, each saying why."""
    for case in ALL:
        if case.raw.get("case_type") == "throughput" and case.published_step_s:
            assert case.skipped is None, f"{case.case_id}: {case.skipped}"
            assert case.plan.gpus == case.cluster.num_gpus
        else:
            assert case.skipped


def test_torchtitan_shards_over_data_and_context_ranks():
    """torchtitan's FSDP2 shards over dp x cp: its context-parallel runs are ZeRO-3 even with one dp rank."""
    cp8 = next(c for c in ALL if c.case_id == "C086_torchtitan_8b_8gpu_cp8_seq262144")
    assert (cp8.plan.dp, cp8.plan.cp, cp8.plan.zero_stage) == (1, 8, 3)


def test_presets_ship_the_fitted_values():
    """The presets carry the values fitted to all sources by the committed benchmark run."""
    fitted = REPORT["fitted"]
    for name in ap.Cluster.presets():
        cluster = ap.Cluster.preset(name)
        fam = "h100" if ("H100" in cluster.gpu or "H200" in cluster.gpu) else "a100"
        assert cluster.sustained_clock_fraction == pytest.approx(fitted[f"clock.{fam}"]), name
        assert cluster.overlap_slowdown == pytest.approx(fitted["overlap"]), name
        kernel = cluster.measurements["attention_efficiency_kernel"]
        assert cluster.attention_efficiency == pytest.approx(min(1.0, kernel * fitted["attention"]), abs=1e-4), name


def test_band_file_is_the_reports_band():
    band = json.loads(BANDS_FILE.read_text())["step_time"]
    assert band["low"] == pytest.approx(REPORT["band"]["low"])
    assert band["high"] == pytest.approx(REPORT["band"]["high"])
    assert band["low"] < 0 < band["high"]


@pytest.mark.parametrize("case", KORTHIKANTI, ids=[c.case_id for c in KORTHIKANTI])
def test_korthikanti_runs_reproduced(case):
    """Oracle: Korthikanti et al. 2022, Table 5 and Sec. 6.3 (step times on Selene, Megatron-LM, full and
    selective recompute): the estimate with the shipped presets is within 15% and the configuration fits."""
    est = ap.estimate(profile_case(case), case.cluster, case.plan, stack=case.stack, memory=memory_model(case))
    assert est.step_time_s == pytest.approx(case.published_step_s, rel=TOLERANCE)
    assert est.fits
    assert family(case) == "a100"
