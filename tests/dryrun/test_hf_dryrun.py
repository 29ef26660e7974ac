"""Dry runs of Hugging Face models: the executor's memory for one rank, against the cost model's estimate
(the estimate is held to the dry run within 5% of the tensor bytes), and tied weights and dropout seen by
both alike."""

from pathlib import Path

import pytest

import autoplan as ap

pytest.importorskip("transformers")

CONFIGS = Path(__file__).parent.parent / "hf_configs"
PLANS = {
    "gpt2 dropout 0.1, dp2 zero1": ("gpt2_dropout", ap.Plan(dp=2, zero_stage=1, micro_batch_size=2, global_batch_size=8)),
    "llama dp2 tp2 sp pp2": ("llama", ap.Plan(dp=2, tp=2, pp=2, sequence_parallel=True, micro_batch_size=1,
                                              global_batch_size=8)),
    "mixtral dp2 zero3": ("mixtral", ap.Plan(dp=2, zero_stage=3, micro_batch_size=2, global_batch_size=8)),
    "qwen-moe dp4 ep4 zero1": ("qwen2_moe", ap.Plan(dp=4, ep=4, zero_stage=1, micro_batch_size=2, global_batch_size=8)),
    "llama cp2 tp2 sp zero1": ("llama", ap.Plan(cp=2, tp=2, sequence_parallel=True, zero_stage=1, micro_batch_size=2,
                                                global_batch_size=8)),
    # one dp x cp replica: ZeRO-3 shards nothing (the MoE layers are not FSDP units over the tp ranks either)
    "qwen-moe tp2 sp ep2 zero3": ("qwen2_moe", ap.Plan(tp=2, ep=2, sequence_parallel=True, zero_stage=3,
                                                       micro_batch_size=2, global_batch_size=8)),
    "mixtral dp2 tp2 zero1": ("mixtral", ap.Plan(dp=2, tp=2, zero_stage=1, micro_batch_size=2, global_batch_size=8)),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_estimate_within_5_percent_of_the_dry_run(name):
    config, plan = PLANS[name]
    path = str(CONFIGS / f"{config}.json")
    dry = ap.dryrun(path, plan, gpus=plan.gpus)
    cluster = ap.Cluster.preset("dgx-h100", gpus=plan.gpus)
    estimate = ap.estimate(ap.profile_model(path), cluster, plan)
    tensors = estimate.memory_per_gpu_bytes - estimate.memory_breakdown.get("reserve", 0)
    assert tensors == pytest.approx(dry.peak_memory_bytes, rel=0.05)


def test_tied_weights_stay_one_tensor_in_the_dry_run():
    """GPT-2's head is its token table: the dry run holds it once, as transformers counts it."""
    path = str(CONFIGS / "gpt2.json")
    plan = ap.Plan(micro_batch_size=1, global_batch_size=1)
    dry = ap.dryrun(path, plan, gpus=1)
    params = ap.profile_model(path).total_params
    assert dry.memory_breakdown["params"] == params * 2  # bf16


def test_a_transformers_module_dry_runs_as_its_config_does():
    transformers = pytest.importorskip("transformers")
    import torch

    from autoplan.models.hf import hf_config

    path = str(CONFIGS / "llama.json")
    with torch.device("meta"):
        module = transformers.AutoModelForCausalLM.from_config(hf_config(path))
    plan = ap.Plan(dp=2, micro_batch_size=1, global_batch_size=2)
    assert ap.dryrun(module, plan, gpus=2, seq_len=64).peak_memory_bytes == \
        ap.dryrun(path, plan, gpus=2).peak_memory_bytes


def test_the_last_stage_holds_its_own_copy_of_a_tied_head():
    """Oracle: the dry run. GPT-2 at pp=2: the first stage holds the token table, the last stage the head tied
    to it as a copy of its own (its gradients summed across the two): the estimate counts that copy on the
    last stage, parameter for parameter, and its whole memory within 5%."""
    from autoplan.costmodel.estimate import Coster

    path = str(CONFIGS / "gpt2.json")
    plan = ap.Plan(pp=2, micro_batch_size=1, global_batch_size=2)
    dry = ap.dryrun(path, plan, gpus=2)
    profile = ap.profile_model(path)
    cluster = ap.Cluster.preset("dgx-h100", gpus=2)
    ranks = Coster.of(profile, cluster).rank_costs(plan)
    for stage in dry.stages:
        assert stage.memory_breakdown["params"] == ranks[stage.stage].layers.dense_params * 2  # bf16
    estimate = ap.estimate(profile, cluster, plan)
    last = estimate.memory_per_stage_bytes[1] - cluster.memory_reserve_bytes
    assert last == pytest.approx(dry.stages[1].peak_memory_bytes, rel=0.05)
