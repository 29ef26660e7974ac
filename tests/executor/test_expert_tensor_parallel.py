"""Expert tensor parallelism (etp, Megatron-Core's expert_tensor_parallel_size with parallel folding): each
expert's SwiGLU split over etp ranks (w1/w3 by rows, w2 by columns), tokens gathered over the etp ranks before
the experts and the partial outputs reduce-scattered after, folded with ep over the dp x cp x tp ranks, with
ZeRO 0-3, tensor and sequence parallelism, context parallelism and pipeline stages, on moe-tiny and deepseek-tiny (a shared expert,
fine-grained experts of width 32, a dense first layer, MLA).

Oracle: the single-process run of the same model, seed and data: the losses of the first steps within a relative
1e-4 (as tests/executor/test_expert_parallel.py), and every parameter's gradient after one step (the expert
weights' slices each rank holds, the router, the shared expert, attention, embedding and head) within a
relative 1e-4 of its largest single-process entry."""

import pytest

from autoplan.schema import Plan
from dist_worker import run_on_ranks, run_plan
from gradient_worker import gradient_errors_on_ranks

GBS, MBS = 8, 2
TOL = 1e-4


def _plan(**kw) -> Plan:
    return Plan(global_batch_size=GBS, micro_batch_size=MBS, **kw)


TWO_RANK_PLANS = {
    "moe dp2 etp2 (ep=1)": ("moe-tiny", _plan(dp=2, etp=2)),
    "moe dp2 etp2 zero3": ("moe-tiny", _plan(dp=2, etp=2, zero_stage=3)),
    "moe tp2 sp etp2 (etp over the tp ranks)": ("moe-tiny", _plan(tp=2, etp=2, sequence_parallel=True)),
    "moe cp2 etp2 (etp over the cp ranks)": ("moe-tiny", _plan(cp=2, etp=2)),
    "deepseek dp2 etp2 zero1 full recompute": ("deepseek-tiny", _plan(dp=2, etp=2, zero_stage=1, recompute="full")),
}
FOUR_RANK_PLANS = {
    "moe dp4 ep2 etp2": ("moe-tiny", _plan(dp=4, ep=2, etp=2)),
    "moe dp4 ep2 etp2 zero2": ("moe-tiny", _plan(dp=4, ep=2, etp=2, zero_stage=2)),
    "moe dp2 x tp2 ep2 etp2 zero3": ("moe-tiny", _plan(dp=2, tp=2, ep=2, etp=2, zero_stage=3)),
    "deepseek dp2 x tp2 sp ep2 etp2 zero1": ("deepseek-tiny", _plan(dp=2, tp=2, ep=2, etp=2, sequence_parallel=True,
                                                                    zero_stage=1)),
    "deepseek pp2 x dp2 etp2 zero2": ("deepseek-tiny", _plan(pp=2, dp=2, etp=2, zero_stage=2)),
}
GRADIENT_PLANS = {  # ZeRO 0: the gradients are plain tensors (or tp DTensors) the recorder reads whole
    2: {"moe dp2 etp2": ("moe-tiny", _plan(dp=2, etp=2)),
        "deepseek tp2 etp2": ("deepseek-tiny", _plan(tp=2, etp=2))},
    4: {"moe dp4 ep2 etp2": ("moe-tiny", _plan(dp=4, ep=2, etp=2)),
        "deepseek dp2 x tp2 sp ep2 etp2": ("deepseek-tiny", _plan(dp=2, tp=2, ep=2, etp=2, sequence_parallel=True))},
}


@pytest.fixture(scope="module")
def reference():
    """Oracle: the single-process runs."""
    return {model: run_plan(model, _plan(), {}) for model in ("moe-tiny", "deepseek-tiny")}


@pytest.fixture(scope="module")
def two_rank_losses():
    return dict(zip(TWO_RANK_PLANS, run_on_ranks(2, [(m, p, {}) for m, p in TWO_RANK_PLANS.values()])))


@pytest.fixture(scope="module")
def four_rank_losses():
    return dict(zip(FOUR_RANK_PLANS, run_on_ranks(4, [(m, p, {}) for m, p in FOUR_RANK_PLANS.values()])))


@pytest.mark.parametrize("name", list(TWO_RANK_PLANS))
def test_two_ranks_match_single_process(name, two_rank_losses, reference):
    assert two_rank_losses[name] == pytest.approx(reference[TWO_RANK_PLANS[name][0]], rel=TOL)
    assert two_rank_losses[name][-1] < two_rank_losses[name][0]  # it trains


@pytest.mark.parametrize("name", list(FOUR_RANK_PLANS))
def test_four_ranks_match_single_process(name, four_rank_losses, reference):
    assert four_rank_losses[name] == pytest.approx(reference[FOUR_RANK_PLANS[name][0]], rel=TOL)


@pytest.mark.parametrize("world", sorted(GRADIENT_PLANS))
def test_gradients_match_single_process(world):
    plans = GRADIENT_PLANS[world]
    for name, errors in zip(plans, gradient_errors_on_ranks(world, list(plans.values()))):
        assert any(".w1" in p for p in errors), name  # the expert weights were compared
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, f"{name}: {worst} off by {errors[worst]:.2e}"
