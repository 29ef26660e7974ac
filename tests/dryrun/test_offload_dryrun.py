"""The dry run of offloading plans: the GPU's bytes and the host's counted apart, held to the estimate."""

import pytest

import autoplan as ap

PLANS = {
    "one GPU, optimizer": ap.Plan(global_batch_size=4, offload="optimizer"),
    "dp2 zero1, optimizer": ap.Plan(dp=2, zero_stage=1, global_batch_size=4, offload="optimizer"),
    "dp2 zero3, optimizer": ap.Plan(dp=2, zero_stage=3, global_batch_size=4, offload="optimizer"),
    "dp2 zero3, params": ap.Plan(dp=2, zero_stage=3, global_batch_size=4, offload="params"),
}


@pytest.fixture(scope="module")
def profile():
    return ap.profile_model("gpt-tiny")


@pytest.mark.parametrize("name", list(PLANS))
def test_dry_run_device_bytes_match_the_estimate(name, profile):
    """Oracle: the estimate (costmodel.rank_memory with costmodel.offload), its GPU bytes within 5%; the
    optimizer states are on the host in both: none on the GPU, 12 B per parameter of the shard (and 2 + 2
    with offload=params) on the host, plus at most a chunk's scratch."""
    plan = PLANS[name]
    cluster = ap.Cluster.preset("dgx-h100", gpus=plan.gpus)
    est = ap.estimate(profile, cluster, plan)
    dry = ap.dryrun("gpt-tiny", plan, gpus=plan.gpus)
    tensors = est.memory_per_gpu_bytes - cluster.memory_reserve_bytes
    assert dry.peak_memory_bytes == pytest.approx(tensors, rel=0.05)
    assert dry.memory_breakdown["optimizer"] == 0 and est.memory_breakdown["optimizer"] == 0
    shard = profile.total_params / (plan.dp if plan.zero_stage else 1)
    per_param = 16 if plan.offload == "params" else 12
    assert dry.host_memory_bytes >= per_param * shard * 0.99  # FSDP pads shards; ZeRO-1 rounds its chunks up
    assert dry.host_memory_bytes <= est.host_memory_per_gpu_bytes * 1.05
    if plan.offload == "params":
        assert dry.memory_breakdown["params"] == 0 and dry.memory_breakdown["grads"] == 0
    assert dry.fits(cluster)


def test_host_memory_over_the_limit_does_not_fit(profile):
    """A dry run whose host bytes exceed the host memory per GPU does not fit, whatever its GPU bytes."""
    plan = PLANS["one GPU, optimizer"]
    dry = ap.dryrun("gpt-tiny", plan, gpus=1)
    cluster = ap.Cluster.preset("dgx-h100", gpus=1)
    tiny_host = cluster.model_copy(update={"host_memory_bytes": dry.host_memory_bytes - 1,
                                           "host_memory_reserve_bytes": 0})
    assert dry.fits(cluster) and not dry.fits(tiny_host)
