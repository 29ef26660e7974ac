"""Context parallelism: plans with cp=2 run on 2 and 4 CPU ranks (gloo) match the single-process run of the
same model, seed and data: losses of the first steps within a relative 1e-4. Each cp rank sees half of every
sequence, so without the ring (attention over all ranks' keys and values) or with wrongly placed positions
the very first loss would already differ; the ring merges attention blocks by log-sum-exp in another order
than one kernel, so float32 sums differ slightly (measured: below 1e-6 relative)."""

from pathlib import Path

import pytest

import autoplan as ap
from autoplan.errors import InvalidPlanError
from autoplan.executor import apply
from autoplan.schema import Plan
from dist_worker import run_on_ranks, run_plan

HF_LLAMA = Path(__file__).parent.parent / "hf_configs" / "llama.json"

GBS, MBS = 8, 2
TOL = 1e-4
# gpt-tiny: learned positions, MHA; moe-tiny: RoPE table, grouped-query attention, routed experts
TWO_RANK_PLANS = {
    "gpt cp2": ("gpt-tiny", Plan(cp=2, global_batch_size=GBS, micro_batch_size=MBS)),
    "moe cp2 zero3 full recompute": ("moe-tiny", Plan(cp=2, zero_stage=3, recompute="full", global_batch_size=GBS,
                                                      micro_batch_size=MBS)),
}
FOUR_RANK_PLANS = {
    "gpt cp2 x dp2 zero0": ("gpt-tiny", Plan(cp=2, dp=2, global_batch_size=GBS, micro_batch_size=MBS)),
    "moe cp2 x dp2 zero1": ("moe-tiny", Plan(cp=2, dp=2, zero_stage=1, global_batch_size=GBS, micro_batch_size=MBS)),
    "gpt cp2 x tp2 sp zero2": ("gpt-tiny", Plan(cp=2, tp=2, sequence_parallel=True, zero_stage=2,
                                                global_batch_size=GBS, micro_batch_size=MBS)),
    "moe pp2 x cp2 interleaved": ("moe-tiny", Plan(pp=2, cp=2, schedule="interleaved-1f1b", virtual_stages=2,
                                                   global_batch_size=GBS, micro_batch_size=MBS)),
}


@pytest.fixture(scope="module")
def reference():
    """Oracle: the single-process run of the same model, seed and global batches."""
    single = Plan(global_batch_size=GBS, micro_batch_size=MBS)
    return {model: run_plan(model, single, {}) for model in ("gpt-tiny", "moe-tiny")}


@pytest.fixture(scope="module")
def two_rank_losses():
    return dict(zip(TWO_RANK_PLANS, run_on_ranks(2, [(model, plan, {}) for model, plan in TWO_RANK_PLANS.values()])))


@pytest.fixture(scope="module")
def four_rank_losses():
    return dict(zip(FOUR_RANK_PLANS, run_on_ranks(4, [(model, plan, {}) for model, plan in FOUR_RANK_PLANS.values()])))


@pytest.mark.parametrize("name", list(TWO_RANK_PLANS))
def test_cp2_matches_single_process(name, two_rank_losses, reference):
    expected = reference[TWO_RANK_PLANS[name][0]]
    assert two_rank_losses[name] == pytest.approx(expected, rel=TOL)
    assert two_rank_losses[name][-1] < two_rank_losses[name][0]  # it trains


@pytest.mark.parametrize("name", list(FOUR_RANK_PLANS))
def test_cp2_with_dp_tp_pp_matches_single_process(name, four_rank_losses, reference):
    assert four_rank_losses[name] == pytest.approx(reference[FOUR_RANK_PLANS[name][0]], rel=TOL)


def test_hugging_face_model_without_found_positions_is_refused_in_one_line():
    """A transformers model whose rotary embedding is not where the layout looks (here: removed from the
    base model) would compute its positions 0..s/cp-1 on every cp rank: refused before any mesh is built."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from autoplan.models.hf import HFCausalLM, hf_config

    hf = AutoModelForCausalLM.from_config(hf_config(str(HF_LLAMA)), attn_implementation="sdpa")
    del hf.model.rotary_emb
    with pytest.raises(InvalidPlanError, match="LlamaForCausalLM found neither a rotary embedding") as err:
        apply(HFCausalLM(hf), Plan(cp=2, global_batch_size=GBS))
    assert "\n" not in str(err.value)


def test_eager_attention_is_refused():
    """cp replaces the fused attention kernel; explicit softmax attention would see only a rank's tokens."""
    with pytest.raises(InvalidPlanError, match="computes it eagerly"):
        apply(ap.models.build_named("gpt-tiny", attn_impl="eager"), Plan(cp=2, global_batch_size=GBS))
