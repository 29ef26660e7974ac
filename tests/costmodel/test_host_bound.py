"""The host's issue time per block (Cluster.host_block_s, measured by profiler.host on a GPU): a block costs
max(device time, host time) per micro-batch, for autoplan's executor only."""

import pytest

import autoplan as ap


def _estimate(profile, cluster, recompute, stack=None, micro_batch_size=1):
    plan = ap.Plan(recompute=recompute, micro_batch_size=micro_batch_size, global_batch_size=8)
    return ap.estimate(profile, cluster, plan, stack=stack)


def _device_block_s(profile, cluster, recompute):
    """Seconds of one block's forward + backward per micro-batch with no host limit (the plan's blocks cost
    the step's compute + recompute parts, spread over the blocks and micro-batches)."""
    est = _estimate(profile, cluster, recompute)
    blocks = {layer.block for layer in profile.layers if layer.block is not None}
    return est, len(blocks)


def test_a_slow_host_sets_the_pace_of_its_mode_only(gpt_eager_profile):
    """Oracle: definition: with host time H per block above the device's, the step grows by
    micro-batches x blocks x (H - device block time); modes whose host time is below the device's are unchanged."""
    base = ap.Cluster.preset("dgx-h100", gpus=1)
    plain, blocks = _device_block_s(gpt_eager_profile, base, "selective")
    device_block_s = (plain.time_breakdown["compute"] + plain.time_breakdown["recompute"]) / 8 / blocks
    host = {"none": 0.0, "selective": device_block_s * 10, "full": 0.0}
    slow = base.model_copy(update={"host_block_s": host})
    est = _estimate(gpt_eager_profile, slow, "selective")
    # the blocks' device time, compute and recompute, is what the host replaces (blocks hold all but the
    # embedding and head, which the host bound leaves alone)
    assert est.step_time_s > plain.step_time_s + 8 * blocks * device_block_s * 8
    assert est.time_breakdown["overhead"] == pytest.approx(est.step_time_s - sum(
        v for k, v in est.time_breakdown.items() if k != "overhead"))
    assert _estimate(gpt_eager_profile, slow, "none").step_time_s == pytest.approx(
        _estimate(gpt_eager_profile, base, "none").step_time_s)


def test_host_time_below_the_device_costs_nothing(gpt_eager_profile):
    base = ap.Cluster.preset("dgx-h100", gpus=1)
    fast = base.model_copy(update={"host_block_s": {"none": 1e-9, "selective": 1e-9, "full": 1e-9}})
    for mode in ("none", "selective", "full"):
        assert _estimate(gpt_eager_profile, fast, mode).step_time_s == pytest.approx(
            _estimate(gpt_eager_profile, base, mode).step_time_s)


def test_other_stacks_are_not_held_to_the_executors_host(gpt_eager_profile):
    """The measured host time is that of autoplan's executor; Megatron-LM's does not pay it."""
    base = ap.Cluster.preset("dgx-h100", gpus=1)
    slow = base.model_copy(update={"host_block_s": {"none": 1.0, "selective": 1.0, "full": 1.0}})
    megatron = ap.Stack.preset("megatron-te")
    assert _estimate(gpt_eager_profile, slow, "none", stack=megatron).step_time_s == pytest.approx(
        _estimate(gpt_eager_profile, base, "none", stack=megatron).step_time_s)
    assert _estimate(gpt_eager_profile, slow, "none").step_time_s > 8 * 2 * 1.0
