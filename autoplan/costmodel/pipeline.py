"""Pipeline schedules: bubble fraction, step time with uneven stages, micro-batches in flight per stage.

p = pipeline stages (pp), m = micro-batches per step, v = virtual stages (model chunks) per rank.
Schedules: "gpipe", "1f1b", "interleaved-1f1b", "zero-bubble" (ZB-H1; with v > 1 its interleaved form).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autoplan.schema import chunks_per_rank

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")


@dataclass(frozen=True)
class PipelineTime:
    """One optimizer step of the pipeline: total_s = compute_s + bubble_s + p2p_s."""

    total_s: float
    compute_s: float   # m micro-batches of forward + backward on the slowest stage
    bubble_s: float    # fill and drain: time the slowest stage is idle waiting for the others
    p2p_s: float       # activation and gradient send/recv on the critical path


def _check(schedule: str, num_micro_batches: int, virtual_stages: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if num_micro_batches < 1 or virtual_stages < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} and virtual_stages={virtual_stages} must be >= 1")


def bubble_fraction(*, schedule: str, pp: int, num_micro_batches: int, virtual_stages: int = 1) -> float:
    """Bubble time / ideal compute time m·(T_F+T_B) (the papers' definition), even stages.

    gpipe, 1f1b:      (p-1)/m      Narayanan et al. 2021 (Megatron-LM, SC'21), Sec. 2.2.1
    interleaved-1f1b: (p-1)/(v·m)  same paper, Sec. 2.2.2
    zero-bubble:      (p-1)/(3·v·m)  ZB-H1 of Qi et al. 2023 ("Zero Bubble Pipeline Parallelism", Sec. 2.1):
                      bubble (p-1)(T_F + T_B - T_W) against 1F1B's (p-1)(T_F + T_B + T_W); with the paper's
                      T_F = T_B = T_W that is a third of 1F1B's; v > 1 divides it by v as interleaving does.
    pp = 1 -> 0. Ignores p2p time and uneven stages (see pipeline_step_s).
    """
    _check(schedule, num_micro_batches, virtual_stages)
    if pp <= 1:
        return 0.0
    v = chunks_per_rank(schedule, virtual_stages)
    third = 3 if schedule == "zero-bubble" else 1
    return (pp - 1) / (third * v * num_micro_batches)


def pipeline_step_s(*, schedule: str, stage_fwd_s: Sequence[float], stage_bwd_s: Sequence[float],
                    num_micro_batches: int, virtual_stages: int = 1, p2p_s: float = 0.0) -> PipelineTime:
    """Step time of a pipeline whose rank i takes f_i forward and b_i backward per micro-batch
    (all its virtual chunks together), c_i = f_i + b_i, slowest rank k = argmax c_i, C = c_k.

    Derivation (even stages reproduce the papers; uneven ones follow the slowest stage):
      1. steady state: the slowest stage is busy m·C (compute_s);
      2. fill and drain: a micro-batch passes once through every other stage, each costing d_i,
         bubble_s = Σ_i d_i - d_k, with
           gpipe, 1f1b:      d_i = c_i            -> even: (m+p-1)(f+b)          (Narayanan et al. 2021, Sec. 2.2.1)
           interleaved-1f1b: d_i = c_i / v       -> even: (m+(p-1)/v)(f+b)      (same paper, Sec. 2.2.2)
           zero-bubble:      d_i = f_i / v       -> even, v=1: bubble (p-1)(T_F+T_B-T_W) of ZB-H1
                             (Qi et al. 2023, Sec. 2.1) with the backward split in halves T_B = T_W = b/2
                             (input gradient B, weight gradient W), so T_B - T_W = 0;
      3. p2p: each forward and backward slot sends one activation / gradient, not overlapped with
         compute (Megatron 1F1B without overlap): 2·(m·v + p - 1)·p2p_s, v = 1 for gpipe and 1f1b —
         interleaving crosses v times more stage boundaries per micro-batch.
    pp = 1 (one stage): m·(f+b), no bubble, no p2p. Ignores the optimizer step, the gradient
    all-reduce tail and the interleaved schedule's extra warm-up stalls when m is not a multiple of p.
    """
    _check(schedule, num_micro_batches, virtual_stages)
    if len(stage_fwd_s) != len(stage_bwd_s) or not stage_fwd_s:
        raise ValueError(f"stage_fwd_s has {len(stage_fwd_s)} entries, stage_bwd_s {len(stage_bwd_s)}; "
                         "need one per pipeline rank, at least one")
    m, pp, v = num_micro_batches, len(stage_fwd_s), chunks_per_rank(schedule, virtual_stages)
    costs = [f + b for f, b in zip(stage_fwd_s, stage_bwd_s)]
    k = max(range(pp), key=costs.__getitem__)
    compute_s = m * costs[k]
    if pp == 1:
        return PipelineTime(total_s=compute_s, compute_s=compute_s, bubble_s=0.0, p2p_s=0.0)
    fill = stage_fwd_s if schedule == "zero-bubble" else costs
    bubble_s = (sum(fill) - fill[k]) / v
    comm_s = 2 * (m * v + pp - 1) * p2p_s
    return PipelineTime(total_s=compute_s + bubble_s + comm_s, compute_s=compute_s, bubble_s=bubble_s, p2p_s=comm_s)


def micro_batches_in_flight(*, schedule: str, pp: int, stage: int, num_micro_batches: int,
                            virtual_stages: int = 1) -> float:
    """Peak micro-batches whose activations pipeline rank `stage` (0-based) holds, in units of one
    micro-batch through ALL of that rank's layers (all its chunks).

    gpipe:            m; all forwards run before any backward (Huang et al. 2019, GPipe).
    1f1b:             min(p - stage, m); warm-up of p - stage - 1 forwards plus one (PipeDream-Flush,
                      Narayanan et al. 2021 "Memory-Efficient Pipeline-Parallel DNN Training";
                      Megatron-LM's 1F1B, Narayanan et al. 2021 Sec. 2.2.1).
    interleaved-1f1b: Megatron-LM's interleaved schedule (schedules.py) warms up
                      w = 2·(p - stage - 1) + (v - 1)·p chunk-forwards, all m·v when m = p; one more is
                      in flight in steady state; a chunk is 1/v of the rank's layers, so
                      min(w + 1, m·v) / v. Stage 0: p·(1 + (p-1)/(p·v)) (Korthikanti et al. 2022, Sec. 4.2.3).
    zero-bubble:      as 1f1b for v = 1 (ZB-H1 keeps 1F1B's peak memory, Qi et al. 2023 Sec. 2.1; torch's
                      ScheduleInterleavedZeroBubble warms up as 1F1B, its pipeline_order for p = 2..8); with
                      v > 1 as interleaved-1f1b (its warm-up). The graphs that wait for their weight-gradient
                      step come on top (costmodel.rank_memory).
    pp = 1: 1 (plain gradient accumulation, one micro-batch at a time). Ignores the weight-gradient
    inputs ZB keeps a little longer and the p2p buffers.
    """
    _check(schedule, num_micro_batches, virtual_stages)
    if not 0 <= stage < max(pp, 1):
        raise ValueError(f"stage={stage} is outside 0..{pp - 1}")
    m, v = num_micro_batches, chunks_per_rank(schedule, virtual_stages)
    if pp <= 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if v == 1:
        return float(min(pp - stage, m))
    total_chunks = m * v
    warmup_chunks = total_chunks if m == pp else 2 * (pp - stage - 1) + (v - 1) * pp
    return min(warmup_chunks + 1, total_chunks) / v



def micro_batches_at_backward(*, schedule: str, pp: int, stage: int, num_micro_batches: int,
                              virtual_stages: int = 1) -> tuple[float, float | None]:
    """(micro-batches pipeline rank `stage` holds when the step's first backward starts, the most it holds
    at any later backward, or None when it runs a single backward per step), in units of one micro-batch
    through all of the rank's layers. The step's gradients exist from its second backward on.

    one stage:        (1, 1 if m >= 2): gradient accumulation, one micro-batch at a time.
    gpipe:            (m, m - 1): every forward first (Huang et al. 2019).
    1f1b, zero-bubble (v = 1): k = min(p - stage, m) at the end of the warm-up (micro_batches_in_flight), k
                      again in steady state (one forward between backwards) when m > p - stage, else k - 1
                      (torch Schedule1F1B; ScheduleInterleavedZeroBubble warms up the same, its pipeline_order).
    interleaved:      Megatron's warm-up (micro_batches_in_flight); steady state holds as many while there are
                      more chunk-forwards than warm-up ones, else a chunk fewer.
    """
    m, v = num_micro_batches, chunks_per_rank(schedule, virtual_stages)
    first = micro_batches_in_flight(schedule=schedule, pp=pp, stage=stage, num_micro_batches=m,
                                    virtual_stages=virtual_stages)
    if pp <= 1:
        return first, (first if m >= 2 else None)
    if schedule == "gpipe":
        later = first - 1
    elif v == 1:
        later = first if m > pp - stage else first - 1
    else:
        warmup_chunks = m * v if m == pp else 2 * (pp - stage - 1) + (v - 1) * pp
        later = first if m * v > warmup_chunks + 1 else first - 1 / v
    return first, (later if later > 0 else None)
