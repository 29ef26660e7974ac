"""The executor's memory model (costmodel.rank_memory, layer_memory, model_states): each piece with a worked
example and its limit cases. The whole is held to the dry run in tests/dryrun and benchmarks/memory_truth.py."""

import pytest

import autoplan as ap
from autoplan.costmodel.pipeline import micro_batches_at_backward
from autoplan.costmodel.layer_memory import backward_excess, executor_activation_bytes
from autoplan.costmodel.model_states import RankMemoryInputs, data_parallel_wrapper, model_states
from autoplan.costmodel.rank_memory import rank_peak
from autoplan.schema import LayerProfile
from autoplan.support import unsupported_reason


def _plan(**kw):
    return ap.Plan(**{"global_batch_size": 64, **kw})


def test_backward_excess_is_the_worst_step_net_of_what_came_before():
    """Worked example: steps (kept, temporaries) = (10, 4), (5, 12), (1, 14): the step temporaries on top
    of what the earlier steps freed are 4 - 0, 12 - 10 = 2, 14 - 15 = -1; the worst moment is the first,
    with 4 bytes of temporaries and nothing freed yet."""
    assert backward_excess([(10, 4), (5, 12), (1, 14)]) == (4, 0)
    assert backward_excess([(0, 4), (5, 12)]) == (12, 0)  # nothing freed before the second step: 12 - 0
    assert backward_excess([(2, 1), (5, 12)]) == (12, 2)  # the second step, after the first freed 2
    assert backward_excess([]) == (0, 0)  # limit case: no layers


@pytest.mark.parametrize("plan, wrapper", [
    (dict(dp=1, zero_stage=3), "none"),                     # dp = 1: no data-parallel wrapper at all
    (dict(dp=8, ep=8), "none"),                             # expert parallelism: gradients averaged by hand
    (dict(dp=8, zero_stage=0), "ddp"),
    (dict(dp=8, zero_stage=1), "ddp"),                      # + executor.zero_one's optimizer
    (dict(dp=8, zero_stage=1, pp=2), "ddp-by-hand"),        # under a pipeline: no DDP hooks
    (dict(dp=4, tp=2, zero_stage=0), "ddp-by-hand"),        # with tp: DDP's hooks miss DTensor gradients
    (dict(dp=1, cp=2, zero_stage=3), "fsdp"),               # the replicas are dp x cp
    (dict(dp=4, tp=2, zero_stage=1), "ddp-by-hand"),        # ZeRO-1 is ZeRO-0 + a sharded optimizer
    (dict(dp=8, zero_stage=2), "fsdp-gathered"),
    (dict(dp=8, zero_stage=3), "fsdp"),
])
def test_the_wrapper_is_the_executors(plan, wrapper):
    """Oracle: executor.data_parallel's table (apply_data_parallel, averages_by_hand, build_optimizer) and
    executor.train (data parallelism over the dp x cp replicas)."""
    assert data_parallel_wrapper(_plan(**plan)) == wrapper


def test_model_states_add_what_the_wrappers_keep():
    """Worked example, Psi = 1e9 parameters on the rank, N_d = 8: DDP keeps its buckets (2 Psi bytes) beside
    2 Psi parameters, 2 Psi gradients, 12 Psi optimizer states; ZeRO-1 on DDP divides the 12 Psi by 8; ZeRO-2 on
    FSDP keeps the gathered 2 Psi as params and its sharded copy 2 Psi / 8 as a buffer."""
    rank = RankMemoryInputs(dense_params=1e9)
    assert model_states(rank, _plan(dp=8, zero_stage=0)) == {"params": 2e9, "grads": 2e9, "optimizer": 12e9,
                                                              "buffers": 2e9}
    assert model_states(rank, _plan(dp=8, zero_stage=1))["optimizer"] == 1.5e9
    assert model_states(rank, _plan(dp=4, tp=2, zero_stage=1))["optimizer"] == 3e9  # also with tp (the rank's params)
    experts = RankMemoryInputs(dense_params=1e9, expert_params=4e9)  # ep=4 of dp=8: experts over 8/4 = 2 ranks
    assert model_states(experts, _plan(dp=8, ep=4, zero_stage=1))["optimizer"] == 12 * (1e9 / 8 + 4e9 / 2)
    zero2 = model_states(rank, _plan(dp=8, zero_stage=2))
    assert zero2 == {"params": 2e9, "grads": 0.25e9, "optimizer": 1.5e9, "buffers": 0.25e9}


def test_pipeline_receive_buffers_are_per_micro_batch():
    """Worked example: a middle stage of 1F1B with m = 16 micro-batches receives activations and gradients,
    one buffer of each per micro-batch: 2 x 16 x boundary."""
    rank = RankMemoryInputs(boundary_bytes=64.0, receives_activations=1, receives_gradients=1)
    assert model_states(rank, _plan(pp=4, dp=4, global_batch_size=64))["buffers"] == 2 * 16 * 64


def _layer(**kw) -> LayerProfile:
    base = dict(name="l", kind="mlp", block=0, fwd_flops=0.0, bwd_flops=0.0, params=0, output_bytes=16,
                activation_bytes=100, activation_tp_sharded_bytes=60, activation_column_input_bytes=16)
    return LayerProfile(**{**base, **kw})


def test_sequence_parallel_keeps_the_gathered_column_input_whole():
    """Worked example, tp = 4: of 100 bytes, 60 lie between the column- and row-parallel GEMMs (/4 = 15);
    of the 40 replicated, 16 are the column GEMM's input. Without SP: 40 + 15 = 55. With SP the sequence-
    sharded 24 are split (/4 = 6) but the input the column GEMM saves is the all-gathered one: 6 + 15 + 16 = 37
    (Korthikanti et al.'s accounting would say 40/4 + 15 = 25)."""
    common = dict(layer=_layer(), tp=4, cp=1, micro_batch_size=1, recompute="none", block_first=False)
    assert executor_activation_bytes(sequence_parallel=False, **common) == 55
    assert executor_activation_bytes(sequence_parallel=True, **common) == 37


def test_the_head_is_not_split_by_tensor_parallelism():
    """The executor gathers the logits before the loss (ColwiseParallel, Replicate output): the head keeps
    all of its activations on every tp rank."""
    head = _layer(kind="head", block=None)
    assert executor_activation_bytes(layer=head, tp=8, sequence_parallel=True, cp=1, micro_batch_size=2,
                                     recompute="none", block_first=False) == 200


@pytest.mark.parametrize("schedule, pp, stage, m, expected", [
    ("1f1b", 1, 0, 1, (1.0, None)),     # one micro-batch, no pipeline: a single backward per step
    ("1f1b", 1, 0, 4, (1.0, 1.0)),
    ("gpipe", 4, 0, 8, (8.0, 7.0)),     # all forwards first
    ("1f1b", 4, 0, 4, (4.0, 3.0)),      # m = p: no steady state, the second backward holds one fewer
    ("1f1b", 4, 0, 8, (4.0, 4.0)),
    ("1f1b", 4, 3, 8, (1.0, 1.0)),      # the last stage: one in flight
])
def test_micro_batches_at_the_first_and_later_backwards(schedule, pp, stage, m, expected):
    """Oracle: the schedules' orders (torch Schedule1F1B / ScheduleGPipe; Narayanan et al. 2021, Sec. 2.2)."""
    assert micro_batches_at_backward(schedule=schedule, pp=pp, stage=stage, num_micro_batches=m) == expected


@pytest.mark.parametrize("plan, experts, refused", [
    (dict(dp=8, ep=8), 8, False),
    (dict(dp=4, ep=8, tp=2), 8, False),            # ep folded over dp x tp (parallel folding)
    (dict(dp=8, ep=8, zero_stage=1), 8, False),    # ep with ZeRO-1 (executor.zero_one)
    (dict(dp=8, ep=8, zero_stage=2), 8, False),    # ep with FSDP (experts over the edp ranks)
    (dict(dp=4, tp=2), 8, False),                  # tp on a MoE model: experts not split, tokens by tp rank
    (dict(dp=4, tp=2), 0, False),                  # tp on a dense one
    (dict(dp=2, ep=4), 8, True),                   # ep does not divide dp*cp*tp
    (dict(dp=4, ep=2, etp=2), 8, False),           # expert TP folded with ep over the dp ranks
    (dict(dp=2, tp=2, etp=2, zero_stage=3), 8, False),
    (dict(dp=2, etp=2), 0, True),                  # etp on a dense model
    (dict(dp=2, etp=2, zero_stage=3, offload="params"), 8, True),  # FSDP2's offload policy needs whole experts
    (dict(pp=2, schedule="zero-bubble", recompute="selective"), 0, True),  # two backward passes under SAC
    (dict(pp=2, schedule="zero-bubble", recompute="full"), 0, True),       # rebuilds for both passes, holds them
    (dict(pp=2, dp=2, schedule="zero-bubble", zero_stage=3), 0, True),   # FSDP reshards between its two passes
    (dict(pp=2, dp=2, schedule="zero-bubble", zero_stage=2), 8, False),
])
def test_plans_the_executor_refuses_are_named(plan, experts, refused):
    """Oracle: what executor.apply refuses (tests/executor/test_expert_parallel.py runs the MoE ones it takes); the estimate then accounts for memory as the papers do (and says so in its notes)."""
    assert (unsupported_reason(_plan(**plan), moe=experts > 0) is not None) == refused


def test_fsdp_shards_stacked_experts_evenly():
    """Worked example: 8 stacked experts over 16 FSDP ranks: the executor cuts them along their second dim
    (executor.data_parallel.even_placement; by rows FSDP2 would pad them to 16 rows, 1/8 on each rank), so
    each rank's optimizer states for 8e9 expert parameters are 12 x 0.5e9 bytes; over 4 ranks, by rows, 12 x 2e9."""
    rank = RankMemoryInputs(expert_params=8e9, experts=8)
    assert model_states(rank, _plan(dp=16, zero_stage=3))["optimizer"] == 6e9
    assert model_states(rank, _plan(dp=4, zero_stage=3))["optimizer"] == 24e9


def test_one_backward_peaks_before_its_gradients():
    """Worked example (DDP, dp=8, 1e9 parameters, 0.1e9 of them after the blocks): one micro-batch keeps
    10 GB in the blocks and 5 GB for the loss, whose backward makes 8 GB of temporaries. With one micro-batch
    per step the peak is that moment, before any gradient: 2 (params) + 12 (optimizer) + 2 (DDP buckets) +
    15 + 8 = 39 GB; through a block the head's 0.2 GB of gradients exist but the moment is smaller. With two
    micro-batches the second backward has all 2 GB of gradients: 41 GB. (The dry run, llama3-8b dp=8 with one
    micro-batch: benchmarks/results/memory_truth.md.)"""
    rank = RankMemoryInputs(dense_params=1e9, root_params=0.2e9, embedding_params=0.1e9, kept=10e9, kept_head=5e9,
                            head_backward=(8e9, 0.0), block_backward=(1e9, 0.0))
    one, when = rank_peak(rank, _plan(dp=8, global_batch_size=8), 0)
    assert (one["grads"], sum(one.values()), when) == (0, 39e9, "backward through the loss (the step's first)")
    two, _ = rank_peak(rank, _plan(dp=8, global_batch_size=16), 0)
    assert (two["grads"], sum(two.values())) == (2e9, 41e9)


@pytest.mark.parametrize("recompute, kept_rows", [("none", 1 + 2 * (4 - 1)), ("selective", 4 - 1), ("full", 0)])
def test_expert_tensor_parallel_keeps_etp_times_the_rows(recompute, kept_rows):
    """Worked example on moe-tiny's MoE layer (rows = [T·k, h] = 64 tokens x 2 x 64 x 2 B = 16,384 B per
    sequence): ep 1 etp 4 against no expert split keeps the rows as gathered (etp x) and, at etp x, the experts'
    GEMM inputs where the single process kept one copy: 1 + 2·(etp-1) = 7 rows without recompute; selective
    recompute reruns the exchange and keeps w2's etp-wide partial output: etp-1 = 3; full recompute only the
    block's input: 0 (rebuilt in backward: 7). The dry run measured the same on mixtral-8x7b (docs/dryrun.md)."""
    from autoplan.costmodel.layer_memory import layer_memory

    moe = next(layer for layer in ap.profile_model("moe-tiny").layers if layer.kind == "moe")
    rows = moe.output_bytes * moe.top_k
    assert rows == 16384
    kw = dict(layer=moe, tp=1, sequence_parallel=False, cp=1, micro_batch_size=1, recompute=recompute,
              block_first=False)
    whole, split = layer_memory(**kw), layer_memory(etp=4, **kw)
    assert split.kept - whole.kept == pytest.approx(kept_rows * rows)
    assert split.kept_none - whole.kept_none == pytest.approx(7 * rows)
