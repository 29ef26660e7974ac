"""Golden: the cost model reproduces published large-scale training runs (benchmarks/published_runs.py)."""

import pytest

from benchmarks.published_runs import RUNS, reproduce

TOLERANCE = 0.15  # relative error of predicted against published MFU (the target)


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_published_run_reproduced(run):
    """Oracle: the run's paper (run.source): measured MFU with its exact configuration (Korthikanti et al.
    2022 Tables 3 and 5 and Sec. 6.3: GPT-3 175B on 64 A100, MT-NLG 530B on 280 and on 2240 A100, GPT 1T on
    512 A100, 22B on 8 A100). The estimate must be within 15% and say the configuration fits in memory."""
    est = reproduce(run)
    assert est.mfu == pytest.approx(run.published_mfu, rel=TOLERANCE)
    assert est.fits, f"{run.name}: predicted {est.memory_per_gpu_bytes / 2**30:.1f} GiB does not fit"
