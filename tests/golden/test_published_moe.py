"""The published MoE runs (benchmarks/data/published_runs_moe.json) as the cost model reads them. Oracle: the
source table's own numbers (its GPUs, parallel sizes, batch, tokens/s/GPU), its statement that dropless routing
is force-balanced, and the settings each run's recipe records (token drop, the dispatcher's overlap, recompute)."""

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
    assert case.stack.grouped_gemm
    if cfg["token_dispatch"] == "tokendrop":  # the 25.09 recipes' apply_moe_token_drop: capacity 1.0, padded
        assert (case.stack.moe_capacity_factor, case.stack.moe_pad_to_capacity) == (1.0, True)
    else:  # dropless rows: the table's note, force-balanced
        assert case.stack.moe_capacity_factor is None and case.routing_imbalance == 1.0
    assert case.stack.moe_a2a_overlap == raw["recipe"]["sets"]["overlap_moe_expert_parallel_comm"]
    assert case.plan.recompute == ("selective" if raw["recipe"]["sets"]["recompute_granularity"] else "none")


def test_moe_run_profile_is_the_builtin_model_force_balanced():
    """qwen3-30b-a3b's profile, at the run's sequence length, with the source's balanced routing."""
    case = next(c for c in cases((MOE,)) if "qwen3-30b" in c.case_id)
    profile = profile_case(case)
    assert profile.num_experts == 128 and profile.top_k == 8 and profile.seq_len == 4096
    assert profile.routing_imbalance == 1.0
