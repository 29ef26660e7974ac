"""Fine-tuning: frozen parameters (requires_grad=False, --trainable) get no gradients and no optimizer states,
and a frozen-embedding plan on 2 CPU ranks (gloo) matches the single-process run of the same frozen model."""

import pytest
import torch

import autoplan as ap
from autoplan.executor import apply, train
from autoplan.executor.train import make_optimizer
from autoplan.models.finetune import add_lora, apply_trainable
from dist_worker import build, run_on_ranks, run_plan

GBS, MBS = 8, 2
TOL = 1e-4  # as tests/executor/test_executor_correctness.py
NOT_EMBEDDING = r"^(?!embed\.)"  # every parameter but the token and position tables
FROZEN = {"trainable": NOT_EMBEDDING}
PLANS = {
    "dp2 zero0": ap.Plan(dp=2, zero_stage=0, global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 zero3": ap.Plan(dp=2, zero_stage=3, global_batch_size=GBS, micro_batch_size=MBS),
    "dp2 zero1 offload optimizer": ap.Plan(dp=2, zero_stage=1, offload="optimizer", global_batch_size=GBS,
                                           micro_batch_size=MBS),
}


@pytest.fixture(scope="module")
def reference():
    """Oracle: the single-process run of the same model with the same parameters frozen."""
    return run_plan("gpt-tiny", ap.Plan(global_batch_size=GBS, micro_batch_size=MBS), FROZEN)


@pytest.fixture(scope="module")
def two_rank_losses():
    return dict(zip(PLANS, run_on_ranks(2, [("gpt-tiny", plan, FROZEN) for plan in PLANS.values()])))


@pytest.mark.parametrize("name", list(PLANS))
def test_frozen_embedding_two_ranks_match_single_process(name, two_rank_losses, reference):
    assert two_rank_losses[name] == pytest.approx(reference, rel=TOL)
    assert two_rank_losses[name][-1] < two_rank_losses[name][0]


def test_frozen_embedding_has_no_gradients_or_optimizer_states():
    """Oracle: requires_grad=False. After training steps the tables are unchanged, have no gradient and no
    optimizer state; every other parameter has both."""
    model = apply_trainable(build("gpt-tiny"), NOT_EMBEDDING)
    before = model.embed.tok.weight.detach().clone()
    par = apply(model, ap.Plan(global_batch_size=GBS, micro_batch_size=MBS))
    optimizer = make_optimizer(par)
    config = model.config
    train(par, steps=2, seq_len=config.seq_len, vocab=config.vocab, device=torch.device("cpu"), lr=1e-2, log=None)
    frozen = [model.embed.tok.weight, model.embed.pos.weight]
    assert all(p.grad is None for p in frozen)
    assert torch.equal(model.embed.tok.weight, before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters())) - 2
    assert all(id(p) not in {id(q) for q in optimizer.param_groups[0]["params"]} for p in frozen)


@pytest.mark.parametrize("zero_stage, shard", [(0, 1), (3, 2)])
def test_dry_run_counts_no_gradients_or_states_for_frozen_parameters(zero_stage, shard):
    """Oracle: per trainable parameter 2 B gradient + 12 B optimizer state (ZeRO paper, K = 12), divided by
    N_d under ZeRO-3; the frozen embedding keeps only its 2 B weights. The estimate from a profile traced
    with the same parameters frozen agrees on both."""
    model = build("gpt-tiny")
    psi = sum(p.numel() for p in model.parameters())
    embedding = model.embed.tok.weight.numel() + model.embed.pos.weight.numel()
    plan = ap.Plan(dp=shard, zero_stage=zero_stage, global_batch_size=GBS)
    dry = ap.dryrun("gpt-tiny", plan, trainable=NOT_EMBEDDING)
    assert dry.memory_breakdown["grads"] == 2 * (psi - embedding) // shard
    assert dry.memory_breakdown["optimizer"] == 12 * (psi - embedding) // shard
    profile = ap.profile_model("gpt-tiny", trainable=NOT_EMBEDDING)
    assert sum(layer.frozen_params for layer in profile.layers) == embedding
    est = ap.estimate(profile, ap.Cluster.preset("dgx-h100", gpus=shard), plan)
    assert est.memory_breakdown["optimizer"] == pytest.approx(12 * (psi - embedding) / shard, rel=0.01)


def test_lora_trains_only_the_adapters():
    """Oracle: LoRA (Hu et al. 2021): the base weights stay as they were; the adapters train."""
    model = add_lora(build("gpt-tiny"), rank=4)
    base = model.layers["0"].attention.wq.base.weight.detach().clone()
    adapter = model.layers["0"].attention.wq.lora_a.weight.detach().clone()
    par = apply(model, ap.Plan(global_batch_size=GBS, micro_batch_size=MBS))
    config = model.config
    train(par, steps=3, seq_len=config.seq_len, vocab=config.vocab, device=torch.device("cpu"), lr=1e-2, log=None)
    assert torch.equal(model.layers["0"].attention.wq.base.weight, base)
    assert not torch.equal(model.layers["0"].attention.wq.lora_a.weight, adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * 4 * (64 + 64) * 4  # 4 layers x 4 projections x r(in + out), hidden 64
