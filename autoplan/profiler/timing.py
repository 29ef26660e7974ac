"""Timing protocol of the profiler's measurements.

`warmup` untimed calls, then `repeats` samples; a sample times `inner` back-to-back calls and divides by
`inner`, chosen so a sample lasts about MIN_SAMPLE_S (launch and timer overheads stay small, as nccl-tests
averages its iterations). Reported: the median and the spread (min, p25, p75, max) of the samples. Under a
process group every statistic is the max over ranks (all_reduce MAX): the slowest rank sets the pace of a
synchronous step. CUDA is timed with torch.cuda.Event, the CPU with time.perf_counter.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

Progress = Callable[[str], None]  # called once per measured item with what was measured
MIN_SAMPLE_S = {"cuda": 1e-3, "cpu": 2e-3}  # target length of one timed sample
MAX_INNER = 1000                            # calls per sample at most


def no_progress(_: str) -> None:
    pass


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    backend = str(dist.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_s(fn: Callable[[], object], *, device: torch.device, inner: int = 1) -> float:
    """Seconds per call of `fn`, averaged over `inner` back-to-back calls (CUDA events on the current
    stream, else perf_counter)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    start_s = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start_s) / inner


def stats(samples: Sequence[float]) -> dict:
    """Median and spread of timing samples, each the max over ranks under a process group."""
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    values = max_over_ranks([q[1], ordered[0], q[0], q[2], ordered[-1]])
    return {"median_s": values[0], "spread": dict(zip(("min_s", "p25_s", "p75_s", "max_s"), values[1:])),
            "repeats": len(ordered)}


def max_over_ranks(values: list[float]) -> list[float]:
    """Element-wise max over all ranks (every rank must call it with the same length); identity alone."""
    if not distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def time_s(fn: Callable[[], object], *, device: torch.device, repeats: int, warmup: int = 2,
           collective: bool = False) -> tuple[list[float], int]:
    """(samples in seconds per call, calls per sample). `collective`: every rank calls fn together, so the
    calls per sample are agreed over ranks and each sample starts after a barrier."""
    for _ in range(warmup):
        fn()
    sync(device)
    one_s = sample_s(fn, device=device)
    if collective:
        one_s = max_over_ranks([one_s])[0]
    inner = int(min(MAX_INNER, max(1, math.ceil(MIN_SAMPLE_S[device.type] / max(one_s, 1e-9)))))
    samples = []
    for _ in range(repeats):
        if collective:
            dist.barrier()
        samples.append(sample_s(fn, device=device, inner=inner))
    return samples, inner
