"""Hugging Face models run by the executor: a plan on 2 CPU ranks (gloo) matches the single-process run of
the same model, seed and data (oracle) within a relative 1e-4 (what the executor cannot do with them is
refused in one line: tests/executor/test_context_parallel.py)."""

from pathlib import Path

import pytest

from autoplan.schema import Plan
from dist_worker import run_on_ranks, run_plan

pytest.importorskip("transformers")

CONFIGS = Path(__file__).parent.parent / "hf_configs"
GBS, MBS = 8, 2
TOL = 1e-4
LLAMA, GPT2, MIXTRAL, QWEN_MOE = (str(CONFIGS / f"{name}.json") for name in ("llama", "gpt2", "mixtral", "qwen2_moe"))
PLANS = {
    "llama dp2": (LLAMA, Plan(dp=2, global_batch_size=GBS, micro_batch_size=MBS)),
    "llama dp2 zero3": (LLAMA, Plan(dp=2, zero_stage=3, global_batch_size=GBS, micro_batch_size=MBS)),
    "llama tp2 sp": (LLAMA, Plan(tp=2, sequence_parallel=True, global_batch_size=GBS, micro_batch_size=MBS)),
    "llama pp2": (LLAMA, Plan(pp=2, schedule="1f1b", global_batch_size=GBS, micro_batch_size=MBS)),
    # GPT-2: fused c_attn split by heads, and the head tied to the token table across tp and pp
    "gpt2 tp2": (GPT2, Plan(tp=2, global_batch_size=GBS, micro_batch_size=MBS)),
    "gpt2 pp2": (GPT2, Plan(pp=2, schedule="1f1b", global_batch_size=GBS, micro_batch_size=MBS)),
    "mixtral dp2": (MIXTRAL, Plan(dp=2, global_batch_size=GBS, micro_batch_size=MBS)),
    # transformers' experts sharded over the ep ranks (routed through autoplan's dispatch and combine)
    "mixtral dp2 ep2": (MIXTRAL, Plan(dp=2, ep=2, global_batch_size=GBS, micro_batch_size=MBS)),
    # ... and with ZeRO-3: the stacked experts an FSDP unit over the ranks holding them
    "mixtral dp2 ep2 zero3": (MIXTRAL, Plan(dp=2, ep=2, zero_stage=3, global_batch_size=GBS, micro_batch_size=MBS)),
    "qwen-moe dp2 ep2 zero1": (QWEN_MOE, Plan(dp=2, ep=2, zero_stage=1, global_batch_size=GBS, micro_batch_size=MBS)),
    # context parallelism: each rank's rotary tables (Llama) or learned positions (GPT-2) at its chunks' global
    # positions, attention through the ring
    "llama cp2": (LLAMA, Plan(cp=2, global_batch_size=GBS, micro_batch_size=MBS)),
    "gpt2 cp2 zero3": (GPT2, Plan(cp=2, zero_stage=3, global_batch_size=GBS, micro_batch_size=MBS)),
    "mixtral cp2": (MIXTRAL, Plan(cp=2, global_batch_size=GBS, micro_batch_size=MBS)),
    # tp on MoE (parallel folding): attention split by tp, each tp rank routing its own sequence shard; the
    # router's and shared expert's gradients summed over the tp ranks
    "mixtral tp2": (MIXTRAL, Plan(tp=2, global_batch_size=GBS, micro_batch_size=MBS)),
    "mixtral tp2 ep2": (MIXTRAL, Plan(tp=2, ep=2, global_batch_size=GBS, micro_batch_size=MBS)),
    "qwen-moe tp2 sp": (QWEN_MOE, Plan(tp=2, sequence_parallel=True, global_batch_size=GBS, micro_batch_size=MBS)),
    "qwen-moe tp2 sp ep2 zero3": (QWEN_MOE, Plan(tp=2, ep=2, sequence_parallel=True, zero_stage=3,
                                                  global_batch_size=GBS, micro_batch_size=MBS)),
}
FOUR_RANK_PLANS = {
    "llama cp2 x tp2 sp zero1": (LLAMA, Plan(cp=2, tp=2, sequence_parallel=True, zero_stage=1, global_batch_size=GBS,
                                             micro_batch_size=MBS)),
    "qwen-moe dp2 x tp2 ep4 zero1": (QWEN_MOE, Plan(dp=2, tp=2, ep=4, zero_stage=1, global_batch_size=GBS,
                                                     micro_batch_size=MBS)),
    "mixtral pp2 x tp2 sp": (MIXTRAL, Plan(pp=2, tp=2, sequence_parallel=True, global_batch_size=GBS,
                                           micro_batch_size=MBS)),
}


@pytest.fixture(scope="module")
def reference():
    """Oracle: the single-process run of each model."""
    single = Plan(global_batch_size=GBS, micro_batch_size=MBS)
    paths = {path for path, _ in [*PLANS.values(), *FOUR_RANK_PLANS.values()]}
    return {path: run_plan(path, single, {}) for path in paths}


@pytest.fixture(scope="module")
def two_rank_losses():
    return dict(zip(PLANS, run_on_ranks(2, [(path, plan, {}) for path, plan in PLANS.values()])))


@pytest.fixture(scope="module")
def four_rank_losses():
    return dict(zip(FOUR_RANK_PLANS, run_on_ranks(4, [(path, plan, {}) for path, plan in FOUR_RANK_PLANS.values()])))


@pytest.mark.parametrize("name", list(PLANS))
def test_two_ranks_match_single_process(name, two_rank_losses, reference):
    expected = reference[PLANS[name][0]]
    assert two_rank_losses[name] == pytest.approx(expected, rel=TOL)
    assert two_rank_losses[name][-1] < two_rank_losses[name][0]  # it trains


@pytest.mark.parametrize("name", list(FOUR_RANK_PLANS))
def test_four_ranks_match_single_process(name, four_rank_losses, reference):
    assert four_rank_losses[name] == pytest.approx(reference[FOUR_RANK_PLANS[name][0]], rel=TOL)
