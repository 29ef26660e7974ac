"""Pipeline schedules: bubble fractions, step time with even and uneven stages, micro-batches in flight."""

import pytest

from autoplan.costmodel.pipeline import bubble_fraction, micro_batches_in_flight, pipeline_step_s


# ----------------------------------------------------------------------------------------- bubble fraction
def test_bubble_fraction_gpipe_and_1f1b():
    """Oracle: (p-1)/m, Narayanan et al. 2021 (Megatron-LM) Sec. 2.2.1."""
    # p = 8, m = 32: 7/32 = 0.21875
    assert bubble_fraction(schedule="1f1b", pp=8, num_micro_batches=32) == 7 / 32
    assert bubble_fraction(schedule="gpipe", pp=8, num_micro_batches=32) == 7 / 32


def test_bubble_fraction_interleaved():
    """Oracle: (p-1)/(v·m), Narayanan et al. 2021 (Megatron-LM) Sec. 2.2.2."""
    # p = 8, m = 32, v = 4: 7/128
    assert bubble_fraction(schedule="interleaved-1f1b", pp=8, num_micro_batches=32, virtual_stages=4) == 7 / 128


def test_bubble_fraction_zero_bubble_is_a_third_of_1f1b():
    """Oracle: ZB-H1 bubble (p-1)(T_F+T_B-T_W) vs 1F1B's (p-1)(T_F+T_B+T_W), T_F=T_B=T_W (Qi et al. 2023 Sec. 2.1)."""
    # p = 8, m = 32: 7/(3·32) = 7/96
    assert bubble_fraction(schedule="zero-bubble", pp=8, num_micro_batches=32) == pytest.approx(7 / 96)


def test_no_pipeline_no_bubble():
    """Oracle: limit case pp = 1, no fill or drain."""
    for schedule in ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"):
        assert bubble_fraction(schedule=schedule, pp=1, num_micro_batches=4) == 0.0


def test_unknown_schedule_raises():
    """Oracle: the schedule names of DESIGN.md."""
    with pytest.raises(ValueError):
        bubble_fraction(schedule="pipedream", pp=4, num_micro_batches=8)


# ----------------------------------------------------------------------------------------- step time
def test_even_stages_1f1b_and_gpipe():
    """Oracle: (m+p-1)(f+b), Narayanan et al. 2021 Sec. 2.2.1; bubble/compute equals (p-1)/m."""
    # p = 4, m = 8, f = 1, b = 2: (8+3)·3 = 33; compute 8·3 = 24; bubble 3·3 = 9
    for schedule in ("gpipe", "1f1b"):
        t = pipeline_step_s(schedule=schedule, stage_fwd_s=[1.0] * 4, stage_bwd_s=[2.0] * 4, num_micro_batches=8)
        assert (t.total_s, t.compute_s, t.bubble_s, t.p2p_s) == pytest.approx((33.0, 24.0, 9.0, 0.0))
        assert t.bubble_s / t.compute_s == pytest.approx(bubble_fraction(schedule=schedule, pp=4, num_micro_batches=8))


def test_even_stages_interleaved():
    """Oracle: (m+(p-1)/v)(f+b), Narayanan et al. 2021 Sec. 2.2.2."""
    # p = 4, m = 8, v = 2, f = 1, b = 2: (8 + 3/2)·3 = 28.5
    t = pipeline_step_s(schedule="interleaved-1f1b", stage_fwd_s=[1.0] * 4, stage_bwd_s=[2.0] * 4,
                        num_micro_batches=8, virtual_stages=2)
    assert t.total_s == pytest.approx(28.5)
    assert t.bubble_s / t.compute_s == pytest.approx(3 / 16)


def test_even_stages_zero_bubble():
    """Oracle: ZB-H1 bubble (p-1)(T_F+T_B-T_W) with T_F = T_B = T_W (Qi et al. 2023 Sec. 2.1)."""
    # p = 4, m = 8, f = 1, b = 2 (B = W = 1): bubble 3·(1+1-1) = 3; total 24 + 3 = 27
    t = pipeline_step_s(schedule="zero-bubble", stage_fwd_s=[1.0] * 4, stage_bwd_s=[2.0] * 4, num_micro_batches=8)
    assert t.total_s == pytest.approx(27.0)
    assert t.bubble_s / t.compute_s == pytest.approx(bubble_fraction(schedule="zero-bubble", pp=4, num_micro_batches=8))


def test_single_stage_has_no_bubble_and_no_p2p():
    """Oracle: limit case pp = 1: m·(f+b), plain gradient accumulation."""
    # m = 5, f = 1, b = 2: 15
    t = pipeline_step_s(schedule="1f1b", stage_fwd_s=[1.0], stage_bwd_s=[2.0], num_micro_batches=5, p2p_s=0.1)
    assert (t.total_s, t.bubble_s, t.p2p_s) == (15.0, 0.0, 0.0)


def test_uneven_stages_slowest_dominates():
    """Oracle: (m-1)·max(c_i) + Σc_i — the slowest stage sets the steady state, fill/drain passes every stage once."""
    # c = [3, 3, 6, 3], m = 8: 7·6 + 15 = 57 (compute 8·6 = 48, bubble 9)
    t = pipeline_step_s(schedule="1f1b", stage_fwd_s=[1, 1, 2, 1], stage_bwd_s=[2, 2, 4, 2], num_micro_batches=8)
    assert (t.total_s, t.compute_s, t.bubble_s) == pytest.approx((57.0, 48.0, 9.0))
    even = pipeline_step_s(schedule="1f1b", stage_fwd_s=[1] * 4, stage_bwd_s=[2] * 4, num_micro_batches=8)
    assert t.total_s > even.total_s


def test_p2p_on_the_critical_path():
    """Oracle: 2·(m·v + p - 1) non-overlapped send/recv slots (Megatron 1F1B without overlap)."""
    # 1f1b, p = 4, m = 8: 2·(8+3)·0.01 = 0.22; interleaved v = 2: 2·(16+3)·0.01 = 0.38
    t = pipeline_step_s(schedule="1f1b", stage_fwd_s=[1.0] * 4, stage_bwd_s=[2.0] * 4, num_micro_batches=8, p2p_s=0.01)
    assert t.p2p_s == pytest.approx(0.22)
    assert t.total_s == pytest.approx(33.22)
    t = pipeline_step_s(schedule="interleaved-1f1b", stage_fwd_s=[1.0] * 4, stage_bwd_s=[2.0] * 4,
                        num_micro_batches=8, virtual_stages=2, p2p_s=0.01)
    assert t.p2p_s == pytest.approx(0.38)


def test_stage_lists_must_match():
    """Oracle: one forward and one backward time per pipeline rank."""
    with pytest.raises(ValueError):
        pipeline_step_s(schedule="1f1b", stage_fwd_s=[1.0, 1.0], stage_bwd_s=[2.0], num_micro_batches=4)


# ----------------------------------------------------------------------------------------- in flight
def test_in_flight_1f1b():
    """Oracle: 1F1B warm-up p - stage - 1 plus one (PipeDream-Flush; Narayanan et al. 2021): stage 0 = p, last = 1."""
    assert micro_batches_in_flight(schedule="1f1b", pp=8, stage=0, num_micro_batches=32) == 8
    assert micro_batches_in_flight(schedule="1f1b", pp=8, stage=7, num_micro_batches=32) == 1
    assert micro_batches_in_flight(schedule="1f1b", pp=8, stage=0, num_micro_batches=4) == 4  # capped by m
    assert micro_batches_in_flight(schedule="zero-bubble", pp=8, stage=0, num_micro_batches=32) == 8


def test_in_flight_gpipe():
    """Oracle: GPipe runs every forward before any backward (Huang et al. 2019): m on every stage."""
    assert micro_batches_in_flight(schedule="gpipe", pp=4, stage=0, num_micro_batches=16) == 16
    assert micro_batches_in_flight(schedule="gpipe", pp=4, stage=3, num_micro_batches=16) == 16


def test_in_flight_interleaved():
    """Oracle: Megatron's interleaved warm-up 2(p-r-1) + (v-1)p chunks, +1; stage 0 = p(1 + (p-1)/(p·v))
    (Korthikanti et al. 2022)."""
    # p = 4, v = 2, m = 8, stage 0: (2·3 + 1·4 + 1)/2 = 11/2 = 5.5 = 4·(1 + 3/8)
    assert micro_batches_in_flight(schedule="interleaved-1f1b", pp=4, stage=0, num_micro_batches=8,
                                   virtual_stages=2) == 5.5
    # last stage: (0 + 4 + 1)/2 = 2.5
    assert micro_batches_in_flight(schedule="interleaved-1f1b", pp=4, stage=3, num_micro_batches=8,
                                   virtual_stages=2) == 2.5
    # m = p: Megatron runs all m·v chunk-forwards first: 8/2 = 4 = m
    assert micro_batches_in_flight(schedule="interleaved-1f1b", pp=4, stage=3, num_micro_batches=4,
                                   virtual_stages=2) == 4
    # v = 1 is plain 1F1B
    assert micro_batches_in_flight(schedule="interleaved-1f1b", pp=4, stage=0, num_micro_batches=8) == 4


def test_in_flight_without_pipeline():
    """Oracle: limit case pp = 1, gradient accumulation holds one micro-batch at a time."""
    assert micro_batches_in_flight(schedule="1f1b", pp=1, stage=0, num_micro_batches=8) == 1
