"""The whole estimate: its parts add up, each parallel dimension moves the numbers the way its
formula says, and the limit cases (a dimension of size 1) cost nothing."""

import pytest

import autoplan as ap
from autoplan.costmodel.memory import model_state_bytes


def _plan(**kw):
    base = dict(dp=1, tp=1, pp=1, cp=1, ep=1, zero_stage=0, recompute="none", sequence_parallel=False,
                micro_batch_size=1, global_batch_size=8, schedule="1f1b", virtual_stages=1)
    base.update(kw)
    return ap.Plan(**base)


def _est(profile, gpus=None, cluster="dgx-h100", **kw):
    plan = _plan(**kw)
    return ap.estimate(profile, ap.Cluster.preset(cluster, gpus=gpus or plan.gpus), plan)


def test_breakdowns_add_up(gpt_eager_profile):
    """Oracle: definition: step time is the sum of its parts; peak memory the sum of its categories."""
    est = _est(gpt_eager_profile, dp=2, tp=2, pp=2, zero_stage=1, recompute="selective", sequence_parallel=True,
               global_batch_size=16)
    assert sum(est.time_breakdown.values()) == pytest.approx(est.step_time_s)
    assert sum(est.memory_breakdown.values()) == est.memory_per_gpu_bytes
    assert est.memory_per_gpu_bytes == max(est.memory_per_stage_bytes)
    assert est.tokens_per_s == pytest.approx(16 * gpt_eager_profile.seq_len / est.step_time_s)


def test_single_gpu_has_no_communication(gpt_eager_profile):
    """Limit case: one GPU, no parallel dimension -> no communication, no bubble."""
    est = _est(gpt_eager_profile)
    for part in ("tp_comm", "cp_comm", "ep_comm", "pp_comm", "pp_bubble", "dp_comm_exposed"):
        assert est.time_breakdown[part] == 0.0


def test_zero_memory_in_estimate_matches_zero_formula(gpt_eager_profile):
    """Oracle: Rajbhandari et al. 2020: with dp=8 and no other split, params/grads/optimizer are the
    ZeRO formula applied to the model's parameter count. Two micro-batches per replica: the peak comes in
    the second backward, with every gradient of the step there (in a single backward per step they are
    made as it runs, and the peak comes before most of them: test_one_backward_peaks_before_its_gradients)."""
    psi = gpt_eager_profile.total_params
    for stage in range(4):
        est = _est(gpt_eager_profile, dp=8, zero_stage=stage, global_batch_size=16)
        expected = model_state_bytes(params=psi, zero_stage=stage, shard_degree=8)
        got = (est.memory_breakdown["params"], est.memory_breakdown["grads"], est.memory_breakdown["optimizer"])
        assert got == pytest.approx(expected, abs=3)


def test_tensor_parallel_group_inside_a_node_is_cheaper_than_across(gpt_eager_profile):
    """Topology: tp=16 on 8-GPU nodes crosses the inter-node links, tp=8 stays on NVLink: the per-GPU
    all-reduce bandwidth of the cross-node group is bound by InfiniBand (Thakur et al. 2005 ring model)."""
    inside = _est(gpt_eager_profile, tp=8, dp=2, global_batch_size=16)
    across = _est(gpt_eager_profile, tp=16, global_batch_size=16)
    per_gpu_inside = inside.time_breakdown["tp_comm"]
    per_gpu_across = across.time_breakdown["tp_comm"] * 2  # half the micro-batches per replica with dp=2
    assert per_gpu_across > 2 * per_gpu_inside


def test_sequence_parallel_reduces_activation_memory(gpt_eager_profile):
    """Oracle: Korthikanti et al. 2022, eq. 2 vs 4: SP splits the 10sbh replicated part by t."""
    no_sp = _est(gpt_eager_profile, tp=8)
    sp = _est(gpt_eager_profile, tp=8, sequence_parallel=True)
    assert sp.memory_breakdown["activations"] < no_sp.memory_breakdown["activations"]


def test_recompute_trades_memory_for_time(gpt_eager_profile):
    """Full recompute keeps 2sbh per layer and runs the forward again (Chen et al. 2016);
    selective recomputes only the attention core (Korthikanti et al. 2022, Sec. 4.3)."""
    none, sel, full = (_est(gpt_eager_profile, recompute=r) for r in ("none", "selective", "full"))
    act = [e.memory_breakdown["activations"] for e in (none, sel, full)]
    assert act[0] > act[1] > act[2]
    assert none.time_breakdown["recompute"] == 0.0
    assert 0.0 < sel.time_breakdown["recompute"] < full.time_breakdown["recompute"]
    assert full.hardware_flops_per_gpu_per_s > full.model_flops_per_gpu_per_s


def test_one_f_one_b_first_stage_holds_most(gpt_eager_profile):
    """Oracle: Narayanan et al. 2021 (PipeDream-Flush): stage i of p keeps p - i micro-batches in flight,
    GPipe keeps all m (Huang et al. 2019)."""
    onef = _est(gpt_eager_profile, pp=2, global_batch_size=8)
    gpipe = _est(gpt_eager_profile, pp=2, global_batch_size=8, schedule="gpipe")
    assert onef.peak_stage == 0
    assert gpipe.memory_breakdown["activations"] > onef.memory_breakdown["activations"]


def test_micro_batch_size_scales_activations(gpt_eager_profile):
    """Activations are linear in micro-batch size (Korthikanti et al. 2022: every term has a factor b)."""
    one = _est(gpt_eager_profile, micro_batch_size=1)
    four = _est(gpt_eager_profile, micro_batch_size=4)
    assert four.memory_breakdown["activations"] == pytest.approx(4 * one.memory_breakdown["activations"], rel=1e-6)


def test_interleaving_shrinks_the_bubble():
    """Oracle: Narayanan et al. 2021, Sec. 2.2.2: the interleaved bubble is (p-1)/(v·m), v times smaller."""
    profile = ap.profile_model("llama3-8b")
    plain = _est(profile, pp=4, global_batch_size=16)
    inter = _est(profile, pp=4, global_batch_size=16, schedule="interleaved-1f1b", virtual_stages=2)
    assert inter.time_breakdown["pp_bubble"] == pytest.approx(plain.time_breakdown["pp_bubble"] / 2, rel=0.1)


def test_context_parallel_splits_activations_and_adds_ring_exchange():
    """Ring attention (Liu et al. 2023): each of cp ranks keeps 1/cp of the sequence's activations and
    exchanges K/V chunks; attention on a long sequence hides part of the exchange."""
    profile = ap.profile_model("llama3-8b", seq_len=32768)
    base = _est(profile, dp=2, global_batch_size=8)
    cp = _est(profile, cp=2, global_batch_size=8)
    assert cp.memory_breakdown["activations"] == pytest.approx(base.memory_breakdown["activations"] / 2, rel=0.01)
    assert cp.time_breakdown["cp_comm"] >= 0.0
    assert base.time_breakdown["cp_comm"] == 0.0


def test_expert_parallel_shards_experts_and_adds_all_to_all(moe_tiny_profile):
    """EP (Lepikhin et al. 2020): experts split over ep ranks, tokens dispatched and combined by all-to-all."""
    dp_only = _est(moe_tiny_profile, dp=4, global_batch_size=8)
    ep = _est(moe_tiny_profile, dp=4, ep=4, global_batch_size=8)
    assert dp_only.time_breakdown["ep_comm"] == 0.0
    assert ep.time_breakdown["ep_comm"] > 0.0
    assert ep.memory_breakdown["params"] < dp_only.memory_breakdown["params"]
    experts = sum(layer.expert_params for layer in moe_tiny_profile.layers)
    saved = 2 * experts * (1 - 1 / 4)  # bf16 expert weights, 3/4 of them live on other ranks
    assert dp_only.memory_breakdown["params"] - ep.memory_breakdown["params"] == pytest.approx(saved, abs=4)


def test_expert_tensor_parallel_splits_expert_width_and_adds_its_collectives(moe_tiny_profile):
    """Expert TP (Megatron-Core's expert_tensor_parallel_size): each expert's width split over etp ranks, so
    ep=2 etp=2 holds the expert weights of ep=4 (a quarter each) and pays the etp gather and reduce-scatter on
    top of ep=2's all-to-all; the expert GEMMs run the same FLOPs (etp x the rows at 1/etp of the width)."""
    ep2 = _est(moe_tiny_profile, dp=4, ep=2, global_batch_size=8)
    ep4 = _est(moe_tiny_profile, dp=4, ep=4, global_batch_size=8)
    etp = _est(moe_tiny_profile, dp=4, ep=2, etp=2, global_batch_size=8)
    assert etp.memory_breakdown["params"] == pytest.approx(ep4.memory_breakdown["params"], abs=4)
    assert etp.memory_breakdown["params"] < ep2.memory_breakdown["params"]
    assert etp.time_breakdown["ep_comm"] > ep2.time_breakdown["ep_comm"]
    assert etp.time_breakdown["compute"] == pytest.approx(ep2.time_breakdown["compute"])
    alone = _est(moe_tiny_profile, dp=2, etp=2, global_batch_size=8)  # etp alone: experts whole nowhere
    experts = sum(layer.expert_params for layer in moe_tiny_profile.layers)
    dp2 = _est(moe_tiny_profile, dp=2, global_batch_size=8)
    assert dp2.memory_breakdown["params"] - alone.memory_breakdown["params"] == pytest.approx(2 * experts / 2, abs=4)
    assert alone.time_breakdown["ep_comm"] > 0.0


def test_invalid_plans_are_refused(gpt_eager_profile, moe_tiny_profile):
    with pytest.raises(ap.InvalidPlanError, match="tp=3 does not divide 16 heads"):
        _est(gpt_eager_profile, tp=3)
    with pytest.raises(ap.InvalidPlanError, match="48 but the cluster has 64 GPUs"):
        ap.estimate(gpt_eager_profile, ap.Cluster.preset("dgx-h100", gpus=64), _plan(dp=48, global_batch_size=48))
    with pytest.raises(ap.InvalidPlanError, match="ep=3 does not divide 4 experts"):
        _est(moe_tiny_profile, dp=3, ep=3, global_batch_size=3)
    with pytest.raises(ap.InvalidPlanError, match="etp=3 does not divide the experts' width 128"):
        _est(moe_tiny_profile, dp=3, etp=3, global_batch_size=3)
    with pytest.raises(ap.InvalidPlanError, match="etp=2 but the model has no experts"):
        _est(gpt_eager_profile, dp=2, etp=2, global_batch_size=2)
    with pytest.raises(ap.InvalidPlanError, match="exceeds the model's 2 layers"):
        _est(gpt_eager_profile, pp=4)


def test_memory_does_not_fit_is_reported():
    """A 70B model on one GPU cannot fit: 16 bytes x 70.6e9 parameters of model states alone."""
    est = _est(ap.profile_model("llama3-70b"), global_batch_size=1)
    assert not est.fits
    assert est.memory_per_gpu_bytes > 16 * 70e9


def test_streaming_bytes_and_the_optimizer_at_their_measured_rates():
    """Oracle: by hand from the layer's bytes. Measuring streaming_efficiency and optimizer_efficiency on a cluster
    changes a MoE layer's forward by exactly its streaming bytes' time at the two rates, and the optimizer step by
    the ratio of the efficiencies; unmeasured (the presets) nothing moves."""
    from autoplan.costmodel.layers import layer_cost

    profile = ap.profile_model("moe-tiny")
    layer = next(layer for layer in profile.layers if layer.kind == "moe")
    base = ap.Cluster.preset("dgx-h100", gpus=8).model_copy(update={"memory_bound_efficiency": 0.2})
    measured = base.model_copy(update={"streaming_efficiency": 1.0, "optimizer_efficiency": 0.8})
    plan = ap.Plan(dp=8, micro_batch_size=2, global_batch_size=16)

    def forward(cluster):
        return layer_cost(layer=layer, profile=profile, cluster=cluster, plan=plan, recompute="none",
                          block_first=False).fwd_compute_s

    streaming_bytes = layer.streaming_bytes * plan.micro_batch_size
    expected = streaming_bytes / base.memory_bandwidth_bytes_per_s * (1 / 0.2 - 1 / 1.0)
    assert forward(base) - forward(measured) == pytest.approx(expected, rel=1e-9)
    step = {c.name + str(c.optimizer_efficiency): ap.estimate(profile, c, plan).time_breakdown["optimizer"]
            for c in (base, measured)}
    assert step["dgx-h100None"] / step["dgx-h1000.8"] == pytest.approx(0.8 / 0.2)


def test_zero1_gathers_count_the_executors_buckets():
    """Oracle: llama3-8b's attention layer by hand: wq and wo 4096 x 4096, wk and wv 1024 x 4096 (= 2^22, a bucket
    exactly), the norm's 4096. At tp=1 the four weights gather alone and the norm rides in a bucket; at tp=8 every
    shard is under a bucket: (2 x 4096^2 + 2 x 1024 x 4096) / 8 + 4096 elements in buckets of 2^22."""
    from autoplan.costmodel.gathers import param_gathers

    layer = next(layer for layer in ap.profile_model("llama3-8b").layers if layer.kind == "attention")
    assert param_gathers(layer=layer, tp=1, ep=1, etp=1) == pytest.approx((4 + 4096 / 2**22, 0.0))
    small = (2 * 4096**2 + 2 * 1024 * 4096) / 8 + 4096
    assert param_gathers(layer=layer, tp=8, ep=1, etp=1) == pytest.approx((small / 2**22, 0.0))


def _memory_only(layer, **update):
    """The layer without its GEMMs and attention core: its compute is its memory-bound ops alone."""
    return layer.model_copy(update={"gemms": [], "attention_core_fwd_flops": 0.0, **update})


def _layer_times(layer, profile, plan, stack=None):
    from autoplan.costmodel.layers import layer_cost

    cost = layer_cost(layer=layer, profile=profile, cluster=ap.Cluster.preset("dgx-h100", gpus=plan.gpus), plan=plan,
                      recompute="none", block_first=False, stack=stack)
    return cost.fwd_compute_s, cost.bwd_compute_s


def test_the_loss_on_gathered_logits_is_not_split_by_tp():
    """Oracle: the executor all-gathers the head's logits under tp and runs the loss on all of them, so the head's
    memory-bound ops take as long at tp=8 as at tp=1; a stack whose loss runs on vocabulary-sharded logits splits
    the sharded part of them by 8."""
    profile = ap.profile_model("llama3-8b")
    head = _memory_only(next(layer for layer in profile.layers if layer.kind == "head"))
    one = _layer_times(head, profile, _plan(tp=1, global_batch_size=1))
    whole = _layer_times(head, profile, _plan(tp=8, global_batch_size=1))
    assert whole == pytest.approx(one)
    sharded = _layer_times(head, profile, _plan(tp=8, global_batch_size=1), stack=ap.Stack(name="vocab-parallel", vocab_parallel_loss=True))
    assert sharded[0] < one[0] / 2 and sharded[1] < one[1] / 2


def test_sequence_parallel_pays_dtensors_copy_per_reduce_scatter():
    """Oracle: DTensor copies the [b, s, h] tensor (read and written) before each reduce-scatter along the
    sequence: with SP a block's layer pays 2·b·s·h·2 bytes at the streaming rate per row-parallel GEMM, in forward
    and in backward; without SP nothing."""
    from autoplan.costmodel.compute import streaming_time_s

    profile = ap.profile_model("llama3-8b")
    attention = _memory_only(next(layer for layer in profile.layers if layer.kind == "attention"))
    plan = _plan(tp=8, sequence_parallel=True, global_batch_size=1)
    cluster = ap.Cluster.preset("dgx-h100", gpus=8)
    copy_s = streaming_time_s(bytes_moved=2.0 * profile.hidden * profile.seq_len * 2 * attention.tp_collectives,
                              cluster=cluster)
    with_copy = _layer_times(attention, profile, plan)
    without = _layer_times(attention.model_copy(update={"tp_collectives": 0}), profile, plan)
    assert attention.tp_collectives == 1
    assert (with_copy[0] - without[0], with_copy[1] - without[1]) == pytest.approx((copy_s, copy_s))
    no_sp = _plan(tp=8, global_batch_size=1)
    assert _layer_times(attention, profile, no_sp) == _layer_times(attention.model_copy(update={"tp_collectives": 0}),
                                                                   profile, no_sp)


def test_backward_prices_the_traced_backward_bytes():
    """Oracle: a layer of memory-bound ops alone: with backward's bytes traced as three times forward's (same
    sharded and streaming shares) backward takes three times forward; a profile without them (older files) twice."""
    profile = ap.profile_model("llama3-8b")
    mlp = next(layer for layer in profile.layers if layer.kind == "mlp")
    plan = _plan(tp=4, global_batch_size=1)
    traced = _memory_only(mlp, memory_bound_bwd_bytes=3 * mlp.memory_bound_bytes,
                          memory_bound_bwd_tp_sharded_bytes=3 * mlp.memory_bound_tp_sharded_bytes,
                          streaming_bwd_bytes=3 * mlp.streaming_bytes)
    fwd, bwd = _layer_times(traced, profile, plan)
    assert bwd == pytest.approx(3 * fwd)
    older = _memory_only(mlp, memory_bound_bwd_bytes=None, memory_bound_bwd_tp_sharded_bytes=None,
                         streaming_bwd_bytes=None)
    fwd, bwd = _layer_times(older, profile, plan)
    assert bwd == pytest.approx(2 * fwd)


def test_a_small_models_buckets_are_its_largest_tensor():
    """Oracle: executor.zero_one's rule, a bucket holds at most min(2^22, the largest tensor) elements. gpt-bench's
    largest tensor is its embedding table (2048 tokens x 256 + 256 positions x 256 = 589,824 elements; 294,912 on
    each of 2 tp ranks), so its gathers and reductions go in buckets that small; llama3-8b's are 2^22."""
    from autoplan.costmodel.gathers import gather_buckets

    small = ap.profile_model("gpt-bench")
    assert gather_buckets(small.layers, tp=1, ep=1, etp=1)[0] == 2048 * 256 + 256 * 256
    assert gather_buckets(small.layers, tp=2, ep=1, etp=1)[0] == (2048 * 256 + 256 * 256) / 2
    assert gather_buckets(ap.profile_model("llama3-8b").layers, tp=8, ep=1, etp=1)[0] == 2**22
