"""How far a prediction can be off: bands from the model's measured errors, not from hope.

Step time: the leave-one-source-out residuals of the published training runs
(benchmarks/published_runs.py writes `bands.json` beside this module; the run's report is
benchmarks/results/published_runs.md): a predicted step time t means the published runs' step times
fell within [t·(1+low), t·(1+high)] for `coverage` of them, each source weighing the same.

Memory: the dry-run grid's tolerance (benchmarks/memory_truth.py: every grid point's total within 5% of
the executor's measured peak). A plan whose upper memory bound crosses the GPU's memory is flagged: it
fits by the estimate but not with room for the model's error.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

BANDS_FILE = Path(__file__).with_name("bands.json")
MEMORY_RELATIVE_ERROR = 0.05  # benchmarks/results/memory_truth.md: 31/31 grid points within 5%


@lru_cache(maxsize=1)
def step_time_band() -> tuple[float, float]:
    """(low, high) relative step-time error band; (0, 0) if the benchmark has not written one."""
    if not BANDS_FILE.is_file():
        return 0.0, 0.0
    band = json.loads(BANDS_FILE.read_text())["step_time"]
    return float(band["low"]), float(band["high"])


def step_time_band_s(step_time_s: float) -> tuple[float, float]:
    """[t·(1+low), t·(1+high)]: where a run predicted at t took, for most published runs."""
    low, high = step_time_band()
    return step_time_s * (1 + low), step_time_s * (1 + high)


def memory_band_bytes(memory_bytes: float) -> tuple[int, int]:
    """memory ± MEMORY_RELATIVE_ERROR (the dry-run grid's tolerance)."""
    return int(memory_bytes * (1 - MEMORY_RELATIVE_ERROR)), int(memory_bytes * (1 + MEMORY_RELATIVE_ERROR))
