"""The executor's numbers: a plan run on 2 and 4 CPU ranks (gloo) matches the single-process run of the
same model, seed and data: losses of the first steps within a relative 1e-4 (float32 sums taken in another
order by the sharded GEMMs and collectives)."""

import pytest

from autoplan.schema import Plan
from dist_worker import run_on_ranks, run_plan

GBS, MBS = 8, 2
TOL = 1e-4
TWO_RANK_PLANS = {
    "dp2 zero0": Plan(dp=2, zero_stage=0, global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 zero1": Plan(dp=2, zero_stage=1, global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 zero2": Plan(dp=2, zero_stage=2, global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 zero3": Plan(dp=2, zero_stage=3, global_batch_size=GBS, micro_batch_size=MBS),
    "tp2": Plan(tp=2, global_batch_size=GBS, micro_batch_size=MBS),
    "tp2 sp": Plan(tp=2, sequence_parallel=True, global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 full recompute": Plan(dp=2, recompute="full", global_batch_size=GBS, micro_batch_size=MBS),
    "tp2 sp selective": Plan(tp=2, sequence_parallel=True, recompute="selective", global_batch_size=GBS,
                             micro_batch_size=MBS),
    "pp2 gpipe": Plan(pp=2, schedule="gpipe", global_batch_size=GBS, micro_batch_size=MBS),
    "pp2 1f1b": Plan(pp=2, schedule="1f1b", global_batch_size=GBS, micro_batch_size=MBS),
    "pp2 interleaved v2": Plan(pp=2, schedule="interleaved-1f1b", virtual_stages=2, global_batch_size=GBS,
                               micro_batch_size=MBS),
    "pp2 zero-bubble": Plan(pp=2, schedule="zero-bubble", global_batch_size=GBS, micro_batch_size=MBS),
    "pp2 uneven 1+3, recompute full/none": Plan(pp=2, layers_per_stage=[1, 3], recompute_per_stage=["full", "none"],
                                                global_batch_size=GBS, micro_batch_size=MBS),
}
EAGER = {"attn_impl": "eager"}  # explicit scores, so selective recompute has something to recompute


@pytest.fixture(scope="module")
def reference():
    """Oracle: the single-process run of the same model, seed and global batches."""
    single = Plan(global_batch_size=GBS, micro_batch_size=MBS)
    return {"gpt": run_plan("gpt-tiny", single, {}), "gpt-eager": run_plan("gpt-tiny", single, EAGER),
            "moe": run_plan("moe-tiny", single, {})}


TWO_RANK_PLANS["moe dp2 ep2"] = Plan(dp=2, ep=2, global_batch_size=GBS, micro_batch_size=MBS)
TWO_RANK_PLANS["moe dp2"] = Plan(dp=2, global_batch_size=GBS, micro_batch_size=MBS)


def _model(name: str) -> str:
    return "moe-tiny" if name.startswith("moe") else "gpt-tiny"


def _reference_key(name: str) -> str:
    return "moe" if name.startswith("moe") else "gpt-eager" if "selective" in name else "gpt"


@pytest.fixture(scope="module")
def two_rank_losses():
    jobs = [(_model(name), plan, EAGER if "selective" in name else {}) for name, plan in TWO_RANK_PLANS.items()]
    return dict(zip(TWO_RANK_PLANS, run_on_ranks(2, jobs)))


@pytest.mark.parametrize("name", list(TWO_RANK_PLANS))
def test_two_ranks_match_single_process(name, two_rank_losses, reference):
    expected = reference[_reference_key(name)]
    assert two_rank_losses[name] == pytest.approx(expected, rel=TOL)
    assert two_rank_losses[name][-1] < two_rank_losses[name][0]  # it trains


FOUR_RANK_PLANS = {
    "dp2 x tp2 sp zero3": Plan(dp=2, tp=2, sequence_parallel=True, zero_stage=3, global_batch_size=GBS,
                               micro_batch_size=MBS),
    "dp2 x tp2 zero0": Plan(dp=2, tp=2, zero_stage=0, global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 x tp2 sp zero1": Plan(dp=2, tp=2, sequence_parallel=True, zero_stage=1, global_batch_size=GBS,
                               micro_batch_size=MBS),
    "pp2 x dp2 zero1": Plan(pp=2, dp=2, zero_stage=1, global_batch_size=GBS, micro_batch_size=MBS),
    "tp2 x pp2 sp": Plan(tp=2, pp=2, sequence_parallel=True, global_batch_size=GBS, micro_batch_size=MBS),
    "moe dp4 ep2": Plan(dp=4, ep=2, global_batch_size=GBS, micro_batch_size=MBS),
    "moe dp4 ep2 zero1": Plan(dp=4, ep=2, zero_stage=1, global_batch_size=GBS, micro_batch_size=MBS),
    "moe pp2 x dp2 ep2": Plan(pp=2, dp=2, ep=2, global_batch_size=GBS, micro_batch_size=MBS),
    "moe pp2 x dp2 ep2 zero1": Plan(pp=2, dp=2, ep=2, zero_stage=1, global_batch_size=GBS, micro_batch_size=MBS),
}


@pytest.fixture(scope="module")
def four_rank_losses():
    jobs = [(_model(name), plan, {}) for name, plan in FOUR_RANK_PLANS.items()]
    return dict(zip(FOUR_RANK_PLANS, run_on_ranks(4, jobs)))


@pytest.mark.parametrize("name", list(FOUR_RANK_PLANS))
def test_four_ranks_match_single_process(name, four_rank_losses, reference):
    assert four_rank_losses[name] == pytest.approx(reference[_reference_key(name)], rel=TOL)
