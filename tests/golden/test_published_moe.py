"""The published MoE runs (benchmarks/data/published_runs_moe.json) as the cost model reads them. Oracle: the
source table's own numbers (its GPUs, parallel sizes, batch, tokens/s/GPU) and its statement that routing is
force-balanced."""

import pytest

from benchmarks.published_cases import MOE, cases, load_raw, profile_case

RAW = {raw["case_id"]: raw for raw in load_raw(MOE)}


@pytest.mark.parametrize("case", cases((MOE,)), ids=lambda c: c.case_id)
def test_moe_runs_map_to_their_published_configuration(case):
    raw = RAW[case.case_id]
    cfg, hw, out = raw["config"], raw["hardware"], raw["outcome"]
    assert case.skipped is None and case.source == "megatron-bridge"
    plan = case.plan
    assert (plan.gpus, plan.tp, plan.pp, plan.ep) == (hw["num_gpus"], cfg["tp"], cfg["pp"], cfg["ep"])
    assert plan.schedule == "interleaved-1f1b" and plan.virtual_stages == cfg["vp"]
    assert plan.num_micro_batches == cfg["grad_accum"]
    # the step time the table implies: GBS x sequence / (tokens/s/GPU x GPUs)
    tokens = cfg["global_batch"] * raw["model"]["seq_len"]
    assert case.published_step_s == pytest.approx(tokens / (out["tokens_per_s_per_gpu"] * hw["num_gpus"]), rel=1e-4)
    assert case.stack.grouped_gemm and case.routing_imbalance == 1.0


def test_moe_run_profile_is_the_builtin_model_force_balanced():
    """qwen3-30b-a3b's profile, at the run's sequence length, with the source's balanced routing."""
    case = next(c for c in cases((MOE,)) if "qwen3-30b" in c.case_id)
    profile = profile_case(case)
    assert profile.num_experts == 128 and profile.top_k == 8 and profile.seq_len == 4096
    assert profile.routing_imbalance == 1.0
