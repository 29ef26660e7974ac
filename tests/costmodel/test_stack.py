"""The software stack and the sustained clock as inputs: each moves exactly the time it describes."""

import pytest
import torch

import autoplan as ap
from autoplan.costmodel.compute import gemm_time_s
from autoplan.costmodel.data_parallel import dp_sync_s
from autoplan.costmodel.estimate import Coster
from autoplan.costmodel.layers import FP8_CAST_BYTES_PER_ELEMENT, layer_cost
from autoplan.errors import InvalidInputError
from autoplan.schema import Stack


@pytest.fixture(scope="module")
def llama_profile():
    with torch.device("meta"):
        model = ap.models.llama(layers=2, hidden=1024, heads=8, kv_heads=8, ffn_hidden=2816, vocab=1000, seq_len=512)
    return ap.profile_model(model)


def _plan(**kw):
    base = dict(dp=1, micro_batch_size=2, global_batch_size=2)
    base.update(kw)
    return ap.Plan(**base)


def _mlp(profile):
    return next(layer for layer in profile.layers if layer.kind == "mlp")


def test_every_stack_preset_loads_with_a_source_for_each_number():
    """Oracle: the presets' contract: every number a stack sets has a source (or says it is judgement)."""
    names = Stack.presets()
    assert {"torch", "torch-compile", "megatron-2021", "megatron-te", "llm-foundry"} <= set(names)
    for name in names:
        stack = Stack.preset(name)
        assert {"memory_bound_traffic", "attention_speedup"} <= stack.sources.keys(), name
    with pytest.raises(InvalidInputError, match="unknown stack"):
        Stack.preset("nonesuch")


def test_sustained_clock_scales_gemm_time_exactly(llama_profile):
    """Worked example: a layer's GEMM seconds are each GEMM's isolated-kernel time / sustained_clock_fraction;
    memory-bound time (HBM, not the SM clock) does not change."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=1).model_copy(update={"sustained_clock_fraction": 1.0})
    slow = cluster.model_copy(update={"sustained_clock_fraction": 0.8})
    layer, plan = _mlp(llama_profile), _plan()
    full = layer_cost(layer=layer, profile=llama_profile, cluster=cluster, plan=plan, recompute="none", block_first=False)
    derated = layer_cost(layer=layer, profile=llama_profile, cluster=slow, plan=plan, recompute="none", block_first=False)
    gemm_s = sum(g.count * gemm_time_s(flops=2.0 * g.m_per_sequence * g.n * g.k * 2, cluster=cluster)
                 for g in layer.gemms)
    # the difference is exactly the GEMM time scaled by 1/0.8 - 1 = 0.25
    assert derated.fwd_compute_s - full.fwd_compute_s == pytest.approx(0.25 * gemm_s, rel=1e-9)


def test_fp8_linears_speed_gemms_and_add_their_casts(llama_profile):
    """Worked example: with fp8_linears each attention/MLP GEMM runs fp8_gemm_speedup times faster, and
    its input and weight casts (3 bytes per element) join the memory-bound time."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=1).model_copy(update={"sustained_clock_fraction": 1.0})
    layer, plan = _mlp(llama_profile), _plan()
    bf16 = layer_cost(layer=layer, profile=llama_profile, cluster=cluster, plan=plan, recompute="none",
                      block_first=False, stack=Stack(name="bf16"))
    fp8 = layer_cost(layer=layer, profile=llama_profile, cluster=cluster, plan=plan, recompute="none",
                     block_first=False, stack=Stack(name="fp8", fp8_linears=True))
    # (a fused stack's memory_bound_traffic scales the casts as it scales the other memory-bound ops; 1 here)
    gemm_s = sum(g.count * gemm_time_s(flops=2.0 * g.m_per_sequence * g.n * g.k * 2, cluster=cluster) for g in layer.gemms)
    cast_bytes = sum(g.count * FP8_CAST_BYTES_PER_ELEMENT * (g.m_per_sequence * 2 * g.k + g.n * g.k) for g in layer.gemms)
    cast_s = cast_bytes / (cluster.memory_bandwidth_bytes_per_s * cluster.memory_bound_efficiency)
    assert cluster.fp8_gemm_speedup == 1.6
    expected = bf16.fwd_compute_s - gemm_s + gemm_s / 1.6 + cast_s
    assert fp8.fwd_compute_s == pytest.approx(expected, rel=1e-9)


def test_fused_stack_moves_fewer_bytes(llama_profile):
    """torch.compile fuses element-wise chains: its memory-bound time is memory_bound_traffic of eager's;
    the GEMMs are the same, so the step is faster but not by more than the memory-bound part."""
    cluster, plan = ap.Cluster.preset("dgx-h100", gpus=1), _plan()
    eager = ap.estimate(llama_profile, cluster, plan, stack=Stack.preset("torch"))
    compiled = ap.estimate(llama_profile, cluster, plan, stack=Stack.preset("torch-compile"))
    assert compiled.step_time_s < eager.step_time_s
    assert compiled.step_time_s > 0.5 * eager.step_time_s


def test_zero3_collectives_pay_latency_per_collective(llama_profile):
    """FSDP gathers and scatters block by block: a stack that gathers module by module (six collectives a
    block) pays six times the latencies on the link; with a bandwidth-free link the difference is
    exactly (6-1) x units x the latency terms."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=256)
    plan = _plan(dp=256, zero_stage=3, global_batch_size=256, micro_batch_size=1)
    per_block = Coster.of(llama_profile, cluster, Stack(name="fsdp")).rank_costs(plan)[0]
    link_1 = dp_sync_s(per_block, cluster, plan, Stack(name="fsdp"))[1]
    link_6 = dp_sync_s(per_block, cluster, plan, Stack(name="ds", zero3_collectives_per_block=6))[1]
    latency = 255 * cluster.inter_node.latency_s  # one all-gather or reduce-scatter over 32 nodes: (n-1)·α_e
    # per micro-batch: 2 gathers + 1 reduce-scatter per unit; units = 2 blocks + 1 (embedding and head) = 3 vs 13
    assert link_6 - link_1 == pytest.approx(3 * latency * (13 - 3), rel=1e-6)


def test_estimate_carries_its_error_band(llama_profile):
    """The step-time band comes from the published runs' cross-validated residuals (costmodel.bands):
    it brackets the estimate; the memory band is the dry-run grid's 5% around the tensors' bytes."""
    est = ap.estimate(llama_profile, ap.Cluster.preset("dgx-h100", gpus=1), _plan())
    low, high = est.step_time_band_s
    assert low < est.step_time_s < high
    mem_low, mem_high = est.memory_band_bytes
    assert mem_low < est.memory_per_gpu_bytes < mem_high
    assert not est.memory_at_risk


def test_memory_at_risk_when_the_band_crosses_the_limit(llama_profile):
    """A plan that fits by the estimate but not at the top of its memory band is flagged."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=1)
    est = ap.estimate(llama_profile, cluster, _plan())
    tight = cluster.model_copy(update={"memory_bytes": est.memory_per_gpu_bytes + 1024})
    flagged = ap.estimate(llama_profile, tight, _plan())
    assert flagged.fits and flagged.memory_at_risk


def test_fused_loss_keeps_16_bit_logits_and_no_loss_temporaries(llama_profile):
    """Worked example (the papers' accounting): a fused cross-entropy keeps the logits in 16 bits, half the
    trace's fp32 copy, and leaves no loss temporaries, so the largest block's working bytes are the rank's."""
    cluster, plan = ap.Cluster.preset("dgx-h100", gpus=1), _plan()
    plain = ap.estimate(llama_profile, cluster, plan, memory="paper", stack=Stack(name="plain"))
    fused = ap.estimate(llama_profile, cluster, plan, memory="paper", stack=Stack(name="fused", fused_loss=True))
    rank = Coster.of(llama_profile, cluster, Stack(name="plain")).rank_costs(plan)[0]
    assert rank.logits_bytes > 0
    drop = plain.memory_breakdown["activations"] - fused.memory_breakdown["activations"]
    assert drop == pytest.approx(rank.logits_bytes / 2, abs=2)
    assert fused.memory_breakdown["temporaries"] == int(rank.working_bytes_but_head)
    assert fused.memory_breakdown["temporaries"] <= plain.memory_breakdown["temporaries"]


def _ranks(profile, cluster, plan, stack=None):
    return Coster.of(profile, cluster, stack).rank_costs(plan)


def test_gathered_logits_cost_an_all_gather_unless_the_loss_is_vocab_parallel(llama_profile):
    """Under tp autoplan's executor all-gathers the [b, s, V] logits forward (backward slices them); a stack
    with a vocabulary-parallel loss does not: the head's tp time differs by exactly that gather (x2: the
    layer's tp time is split evenly between forward and backward)."""
    from autoplan.costmodel import comm
    cluster, plan = ap.Cluster.preset("dgx-h100", gpus=2), _plan(tp=2)
    head = next(layer for layer in llama_profile.layers if layer.kind == "head")
    kw = dict(layer=head, profile=llama_profile, cluster=cluster, plan=plan, recompute="none", block_first=False)
    gathered = layer_cost(**kw, stack=Stack(name="executor"))
    parallel = layer_cost(**kw, stack=Stack(name="megatron", vocab_parallel_loss=True))
    topo = comm.group_topology(group_size=2, stride=1, gpus_per_node=8)
    logits = llama_profile.vocab_size * llama_profile.seq_len * 2 * 2  # V x s x bf16 x 2 sequences
    gather = comm.group_all_gather_s(message_bytes=logits, topo=topo, cluster=cluster)
    assert gathered.tp_comm_s - parallel.tp_comm_s == pytest.approx(2 * gather)


def test_full_recompute_reruns_the_forward_collectives(llama_profile):
    """Megatron-LM's checkpointed forward repeats its tp all-reduces: full recompute adds the forward half of
    a block's tp time to its recompute; without tp nothing is added beyond the forward compute."""
    cluster, plan = ap.Cluster.preset("dgx-h100", gpus=2), _plan(tp=2)
    attention = next(layer for layer in llama_profile.layers if layer.kind == "attention")
    kw = dict(layer=attention, profile=llama_profile, cluster=cluster, plan=plan, block_first=True)
    full = layer_cost(**kw, recompute="full")
    assert full.tp_comm_s > 0
    assert full.recompute_s == pytest.approx(full.fwd_compute_s + full.tp_comm_s / 2)


def test_zero2_reduce_scatters_every_micro_batch(llama_profile):
    """Without a pipeline FSDP reshards gradients after each micro-batch: ZeRO-2's time on the link grows
    with the micro-batches (four here) by m reduce-scatters, the gather stays once per step."""
    cluster = ap.Cluster.preset("dgx-h100", gpus=8)
    one = _plan(dp=8, zero_stage=2, micro_batch_size=1, global_batch_size=8)
    four = _plan(dp=8, zero_stage=2, micro_batch_size=1, global_batch_size=32)
    from autoplan.costmodel import comm
    rank = _ranks(llama_profile, cluster, one)[0]
    topo = comm.group_topology(group_size=8, stride=1, gpus_per_node=8)
    reduce_scatter = comm.group_reduce_scatter_s(message_bytes=2 * rank.layers.dense_params, topo=topo, cluster=cluster)
    gather = comm.group_all_gather_s(message_bytes=2 * rank.layers.dense_params, topo=topo, cluster=cluster)
    assert dp_sync_s(rank, cluster, one)[1] == pytest.approx(reduce_scatter + gather)
    assert dp_sync_s(_ranks(llama_profile, cluster, four)[0], cluster, four)[1] == pytest.approx(4 * reduce_scatter + gather)


def test_every_other_mm_reruns_the_blocks_second_fourth_and_sixth_matmul(llama_profile):
    """Oracle: torchtitan's op-level policy counts a block's matmuls in forward order (q, k, v, o, gate,
    up, down) and recomputes the even ones: k, o and up. Kept bytes drop by their outputs; recompute time
    grows by their GEMM time."""
    from autoplan.costmodel.layers import every_other_mm

    attention, mlp = [layer for layer in llama_profile.layers if layer.block == 0]
    rerun_attention = every_other_mm(attention, 0)
    rerun_mlp = every_other_mm(mlp, sum(g.count for g in attention.gemms))
    assert [(g.n, g.k, n) for g, n in rerun_attention] == [(1024, 1024, 1), (1024, 1024, 1)]  # k, o
    assert [(g.n, g.k, n) for g, n in rerun_mlp] == [(2816, 1024, 1)]                        # up
    plan = _plan(recompute="selective")
    torchtitan = Stack.preset("torch").model_copy(update={"selective_recompute": "every-other-mm"})
    ours, theirs = Coster(llama_profile, ap.Cluster.preset("dgx-h100", gpus=1)), \
        Coster(llama_profile, ap.Cluster.preset("dgx-h100", gpus=1), torchtitan)
    block = (attention, mlp)
    dropped = sum(n * g.m_per_sequence * g.n * 2 for g, n in rerun_attention + rerun_mlp) * plan.micro_batch_size
    kept = lambda coster: sum(m.kept for m in coster.layers_memory(block, plan, "selective"))  # noqa: E731
    assert kept(ours) - kept(theirs) == pytest.approx(dropped)
    rerun_s = sum(n / g.count * g.count * gemm_time_s(flops=2.0 * g.m_per_sequence * g.n * g.k * 2,
                                                      cluster=ours.cluster) / ours.cluster.sustained_clock_fraction
                  for g, n in rerun_attention + rerun_mlp)
    recompute = lambda coster: coster.layers_cost(block, plan, "selective")[0].recompute_s  # noqa: E731
    assert recompute(theirs) - recompute(ours) == pytest.approx(rerun_s)


def test_vocabulary_parallel_loss_splits_the_heads_logits_over_tp(llama_profile):
    """Oracle: torch's loss_parallel keeps each rank's 1/tp of the logits; the head's input stays whole."""
    head = next(layer for layer in llama_profile.layers if layer.kind == "head")
    plan = _plan(tp=2)
    cluster = ap.Cluster.preset("dgx-h100", gpus=2)
    gathered = Coster(llama_profile, cluster).layers_memory((head,), plan, "none")[0]
    parallel = Coster(llama_profile, cluster, Stack.preset("torch").model_copy(
        update={"vocab_parallel_loss": True})).layers_memory((head,), plan, "none")[0]
    column_input = head.activation_column_input_bytes * plan.micro_batch_size
    assert parallel.kept == pytest.approx(column_input + (gathered.kept - column_input) / 2)
    assert parallel.output_kept == pytest.approx(gathered.output_kept / 2)
    assert parallel.backward_excess < gathered.backward_excess


def test_zero3_gathered_unit_follows_the_stacks_gathering(llama_profile):
    """Oracle: ZeRO-3 holds two gathered units: a whole block where a block is one FSDP unit, the largest
    module (the rank's largest weight) where the stack gathers module by module (DeepSpeed's stage 3)."""
    plan = _plan(dp=2, zero_stage=3, global_batch_size=4)
    cluster = ap.Cluster.preset("dgx-a100-80gb", gpus=2)
    by_block = ap.estimate(llama_profile, cluster, plan, memory="paper", stack=Stack.preset("torch"))
    by_module = ap.estimate(llama_profile, cluster, plan, memory="paper", stack=Stack.preset("megatron-2021"))
    block_params = sum(layer.params for layer in llama_profile.layers if layer.block == 0)
    with torch.device("meta"):
        model = ap.models.llama(layers=2, hidden=1024, heads=8, kv_heads=8, ffn_hidden=2816, vocab=1000, seq_len=512)
    largest = max(p.numel() for p in model.parameters())  # an MLP weight, 2816 x 1024
    assert largest == 2816 * 1024
    assert by_block.memory_breakdown["buffers"] == 2 * 2 * block_params
    assert by_module.memory_breakdown["buffers"] == 2 * 2 * largest


@pytest.fixture(scope="module")
def deepseek_tiny_profile():
    return ap.profile_model("deepseek-tiny")


def _megatron(**update):
    return Stack.preset("megatron-te").model_copy(update={"selective_recompute": "modules", **update})


def test_mla_up_proj_recompute_reruns_the_up_projections_and_keeps_less(deepseek_tiny_profile):
    """Oracle: Megatron-LM's recompute_modules (Megatron-Bridge docs/training/activation-recomputation.md):
    mla_up_proj reruns MLA's up-projections from the latents (q_b: k = q_lora_rank 32 < hidden 64, n = 4 heads x
    24 = 96; kv_b: k = kv_lora_rank 16, n = 4 x (16 + 16) = 128) and does not keep their outputs: per sequence
    of 64 tokens (96 + 128) x 64 x 2 B = 28,672 B less, times the micro-batch of 2."""
    profile = deepseek_tiny_profile
    attention = next(layer for layer in profile.layers if layer.kind == "attention")
    up = [g for g in attention.gemms if g.k < profile.hidden and g.n != profile.hidden]
    assert sorted((g.n, g.k) for g in up) == [(96, 32), (128, 16)]
    plan = _plan(recompute="selective")
    cluster = ap.Cluster.preset("dgx-h100", gpus=1)
    kw = dict(layer=attention, profile=profile, cluster=cluster, plan=plan, block_first=True)
    core = layer_cost(recompute="selective", stack=_megatron(recompute_modules=["core_attn"]), **kw)
    mla = layer_cost(recompute="selective", stack=_megatron(recompute_modules=["mla_up_proj"]), **kw)
    assert core.activation_bytes - mla.activation_bytes == pytest.approx(28_672 * 2)
    assert core.recompute_s == 0.0 and mla.recompute_s > 0.0
    assert mla.recompute_flops_per_sequence == pytest.approx(sum(2.0 * g.count * g.m_per_sequence * g.n * g.k
                                                                 for g in up))


def test_mlp_recompute_reruns_a_dense_mlp_whole_and_not_the_experts(deepseek_tiny_profile):
    """Oracle: the same docs: 'mlp' reruns a dense MLP whole (it keeps its [b, s, h] input) and has no effect on
    MoE layers."""
    profile = deepseek_tiny_profile
    plan = _plan(recompute="selective")
    cluster = ap.Cluster.preset("dgx-h100", gpus=1)
    stack = _megatron(recompute_modules=["mlp"])
    mlp = next(layer for layer in profile.layers if layer.kind == "mlp" and layer.block is not None)
    cost = layer_cost(layer=mlp, profile=profile, cluster=cluster, plan=plan, recompute="selective", stack=stack,
                      block_first=False)
    assert cost.recompute_s == pytest.approx(cost.fwd_compute_s)
    assert cost.activation_bytes == pytest.approx(profile.hidden * profile.seq_len * 2 * plan.micro_batch_size)
    moe = next(layer for layer in profile.layers if layer.kind == "moe")
    moe_cost = layer_cost(layer=moe, profile=profile, cluster=cluster, plan=plan, recompute="selective", stack=stack,
                          block_first=False)
    assert moe_cost.recompute_s == 0.0


def test_fp8_experts_speed_the_expert_gemms():
    """Oracle: fp8_linears' rule applied to the experts where the stack's grouped linears run in float8:
    qwen3-30b-a3b's MoE layer (128 experts, ep 8, grouped) computes faster; a stack without fp8_experts
    leaves it as in bf16."""
    profile = ap.profile_model("qwen3-30b-a3b")
    moe = next(layer for layer in profile.layers if layer.kind == "moe")
    cluster = ap.Cluster.preset("dgx-h100", gpus=8)
    kw = dict(layer=moe, profile=profile, cluster=cluster, plan=ap.Plan(dp=8, ep=8, global_batch_size=8),
              recompute="none", block_first=False)
    te = Stack.preset("megatron-te").model_copy(update={"grouped_gemm": True})
    bf16 = layer_cost(stack=te, **kw)
    fp8_dense_only = layer_cost(stack=te.model_copy(update={"fp8_linears": True}), **kw)
    fp8 = layer_cost(stack=te.model_copy(update={"fp8_linears": True, "fp8_experts": True}), **kw)
    assert fp8_dense_only.fwd_compute_s == pytest.approx(bf16.fwd_compute_s)
    assert fp8.fwd_compute_s < bf16.fwd_compute_s
