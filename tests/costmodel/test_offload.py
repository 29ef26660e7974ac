"""Offload (Plan.offload) in the cost model: worked examples of the formulas, and what moves off the GPU."""

import pytest

import autoplan as ap
from autoplan.costmodel.offload import cpu_adam_s, host_link_s, host_state_bytes, offloaded_step_s
from autoplan.schema import Link

GIB = 2**30


@pytest.fixture(scope="module")
def h100():
    return ap.Cluster.preset("dgx-h100", gpus=8)


def test_host_link_worked_example(h100):
    """α + M/B: 2 GB over a 50 GB/s PCIe Gen5 link with 10 µs latency = 0.04 s + 10 µs; 0 bytes -> 0 s."""
    assert host_link_s(message_bytes=2e9, cluster=h100) == pytest.approx(0.04 + 10e-6)
    assert host_link_s(message_bytes=0, cluster=h100) == 0.0


def test_cpu_adam_worked_example(h100):
    """28 B/param streamed; 614.4 GB/s shared by 8 GPUs at the preset's efficiency 0.223 (what the executor's
    CPU step measured) = 17.1 GB/s per GPU: 1e9 params -> 28e9 / 17.1e9 = 1.64 s. A rank alone on the node
    is no faster (its step is bound by the cores of its share)."""
    per_gpu = 614.4e9 / 8 * h100.cpu_optimizer_efficiency
    assert per_gpu == pytest.approx(17.1e9, rel=0.01)
    assert cpu_adam_s(shard_params=1e9, cluster=h100) == pytest.approx(28e9 / per_gpu)
    assert cpu_adam_s(shard_params=1e9, cluster=h100.with_gpus(1)) == pytest.approx(28e9 / per_gpu)
    assert cpu_adam_s(shard_params=0, cluster=h100) == 0.0


def test_offloaded_step_adds_the_copies_for_the_optimizer_only(h100):
    """offload=optimizer: grads down (2 B/param) and params up (2 B/param) at 50 GB/s beside the CPU step;
    offload=params: FSDP put them on the host already, only the CPU step."""
    plan = ap.Plan(global_batch_size=8, offload="optimizer")
    copies = 2 * (10e-6 + 2e9 / 50e9)
    cpu = 28e9 / (614.4e9 / 8 * h100.cpu_optimizer_efficiency)
    assert offloaded_step_s(shard_params=1e9, plan=plan, cluster=h100) == pytest.approx(cpu + copies)
    plan3 = ap.Plan(dp=8, zero_stage=3, global_batch_size=8, offload="params")
    assert offloaded_step_s(shard_params=1e9, plan=plan3, cluster=h100) == pytest.approx(cpu)
    assert offloaded_step_s(shard_params=1e9, plan=ap.Plan(global_batch_size=8), cluster=h100) == 0.0


def test_host_state_bytes():
    """ZeRO's K = 12 bytes per parameter of the optimizer shard; with params also 2 + 2 of the FSDP shard."""
    none = ap.Plan(global_batch_size=8)
    assert host_state_bytes(optimizer_shard_params=1e9, sharded_params=1e9, plan=none) == 0
    opt = none.model_copy(update={"offload": "optimizer"})
    assert host_state_bytes(optimizer_shard_params=1e9, sharded_params=1e9, plan=opt) == 12e9
    par = ap.Plan(dp=2, zero_stage=3, global_batch_size=8, offload="params")
    assert host_state_bytes(optimizer_shard_params=1e9, sharded_params=1e9, plan=par) == 16e9


def test_offload_params_needs_zero3():
    with pytest.raises(ValueError, match="offload=params needs zero_stage 3"):
        ap.Plan(dp=2, zero_stage=2, global_batch_size=8, offload="params")


def test_offload_moves_optimizer_states_to_the_host(h100):
    """Oracle: the same plan without offload: its optimizer bytes leave the GPU (and the step's scratch with
    them), the host holds 12 B per parameter of the shard; the step is slower by the CPU step and copies."""
    profile = ap.profile_model("llama3-8b", seq_len=2048)
    one = h100.with_gpus(1)
    plan = ap.Plan(global_batch_size=8, recompute="full")
    base, off = (ap.estimate(profile, one, p) for p in (plan, plan.model_copy(update={"offload": "optimizer"})))
    assert base.memory_breakdown["optimizer"] == pytest.approx(12 * profile.total_params, rel=1e-6)
    assert off.memory_breakdown["optimizer"] == 0
    assert off.host_memory_per_gpu_bytes >= 12 * profile.total_params
    assert off.host_memory_per_gpu_bytes - 12 * profile.total_params <= 48 * 2**20  # a chunk's scratch
    assert off.host_memory_limit_bytes == (2048 - 256) * GIB  # one GPU in the job: the node's host memory
    assert not base.fits and off.fits
    assert off.time_breakdown["optimizer"] > base.time_breakdown["optimizer"]


def test_host_memory_is_a_limit(h100):
    """A node with 64 GiB of host memory cannot hold llama3-8b's 96 GB of optimizer states."""
    profile = ap.profile_model("llama3-8b", seq_len=2048)
    small = h100.with_gpus(1).model_copy(update={"host_memory_bytes": 64 * GIB, "host_memory_reserve_bytes": 0})
    est = ap.estimate(profile, small, ap.Plan(global_batch_size=8, recompute="full", offload="optimizer"))
    assert est.memory_per_gpu_bytes <= small.memory_bytes and not est.fits
    with pytest.raises(ap.InfeasiblePlanError):
        ap.search(profile, small, global_batch_size=8)


def test_search_offloads_only_where_the_host_is_known(h100):
    """llama3-8b on one H100: nothing fits on the GPU alone (16 B/param = 128 GB); with the host the search
    answers with an offloaded plan; a cluster without host numbers answers as before (nothing fits)."""
    profile = ap.profile_model("llama3-8b", seq_len=2048)
    one = h100.with_gpus(1)
    best = ap.search(profile, one, global_batch_size=8, top_k=1).best
    assert best.offload == "optimizer"
    with pytest.raises(ap.InfeasiblePlanError):
        ap.search(profile, one, global_batch_size=8, offload="none")
    unknown = one.model_copy(update={"host_memory_bytes": 0, "host_link": None})
    with pytest.raises(ap.InfeasiblePlanError):
        ap.search(profile, unknown, global_batch_size=8)


def test_offload_free_plans_keep_their_estimates(h100):
    """Backward compatibility: a plan file without `offload` reads as offload=none and its estimate has no
    host bytes."""
    plan = ap.Plan.model_validate({"dp": 8, "global_batch_size": 64})
    assert plan.offload == "none"
    est = ap.estimate(ap.profile_model("gpt-tiny"), h100, plan)
    assert est.host_memory_per_gpu_bytes == 0
    assert isinstance(h100.host_link, Link)
