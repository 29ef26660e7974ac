"""Pipeline timelines drawn in reports agree with the cost model's schedule formulas."""

import pytest

from autoplan.costmodel.pipeline import pipeline_step_s
from autoplan.report.timeline import schedule_timeline


def _makespan(ops):
    return max(op.end_s for op in ops)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1)])
@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 4)])
def test_even_stages_match_the_formula(schedule, v, pp, m):
    """Oracle: pipeline_step_s (Narayanan et al. 2021: (m + p - 1)(f + b), interleaved (m + (p-1)/v)(f + b);
    ZB-H1 with B = W = b/2: m(f + b) + (p - 1) f)."""
    f, b = 1.0, 2.0
    ops = schedule_timeline(schedule=schedule, stage_fwd_s=[f] * pp, stage_bwd_s=[b] * pp, num_micro_batches=m,
                            virtual_stages=v)
    expected = pipeline_step_s(schedule=schedule, stage_fwd_s=[f] * pp, stage_bwd_s=[b] * pp,
                               num_micro_batches=m, virtual_stages=v).total_s
    assert _makespan(ops) == pytest.approx(expected)
    per_rank = len(ops) // pp
    assert per_rank == m * v * (3 if schedule == "zero-bubble" else 2)


def test_one_f_one_b_holds_at_most_p_minus_r_micro_batches():
    """Oracle: 1F1B's in-flight bound min(p - r, m) (micro_batches_in_flight): forwards begun, backwards not done."""
    pp, m = 4, 8
    ops = schedule_timeline(schedule="1f1b", stage_fwd_s=[1.0] * pp, stage_bwd_s=[2.0] * pp, num_micro_batches=m)
    for r in range(pp):
        mine = sorted((op for op in ops if op.rank == r), key=lambda op: op.start_s)
        live = peak = 0
        for op in mine:
            live += 1 if op.kind == "F" else -1
            peak = max(peak, live)
        assert peak == min(pp - r, m)
