"""Offloading (Plan.offload) changes where the states live, not the numbers: offloaded ZeRO-3 (FSDP2's
CPUOffloadPolicy) and the offloaded optimizer on 2 CPU ranks (gloo) match the single-process losses."""

import pytest

from autoplan.schema import Plan
from dist_worker import run_on_ranks, run_plan

GBS, MBS = 8, 2
TOL = 1e-4  # as tests/executor/test_executor_correctness.py: float32 sums taken in another order
PLANS = {
    "dp2 zero3 offload params": Plan(dp=2, zero_stage=3, offload="params", global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 zero3 offload optimizer": Plan(dp=2, zero_stage=3, offload="optimizer", global_batch_size=GBS,
                                        micro_batch_size=MBS),
    "dp2 zero1 offload optimizer": Plan(dp=2, zero_stage=1, offload="optimizer", global_batch_size=GBS,
                                        micro_batch_size=MBS),
}


@pytest.fixture(scope="module")
def reference():
    """Oracle: the single-process run of the same model, seed and global batches, nothing offloaded."""
    return run_plan("gpt-tiny", Plan(global_batch_size=GBS, micro_batch_size=MBS), {})


@pytest.fixture(scope="module")
def two_rank_losses():
    return dict(zip(PLANS, run_on_ranks(2, [("gpt-tiny", plan, {}) for plan in PLANS.values()])))


@pytest.mark.parametrize("name", list(PLANS))
def test_offloaded_plans_match_single_process(name, two_rank_losses, reference):
    assert two_rank_losses[name] == pytest.approx(reference, rel=TOL)
    assert two_rank_losses[name][-1] < two_rank_losses[name][0]  # it trains


def test_offloaded_optimizer_single_process_is_the_same_arithmetic(reference):
    """Oracle: the plain run; the offloaded step updates a host copy of the same fp32 numbers and copies it
    back, so a float32 run gives the same losses to the bit."""
    offloaded = run_plan("gpt-tiny", Plan(global_batch_size=GBS, micro_batch_size=MBS, offload="optimizer"), {})
    assert offloaded == reference
