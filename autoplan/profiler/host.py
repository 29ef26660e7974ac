"""How long the host takes to issue one transformer block, per recompute mode.

On a GPU the host enqueues kernels ahead of the device, so a block costs max(device time, host time)
per micro-batch, not their sum. The host's part is small for an eager block (one dispatch per op), but
the executor's selective recompute runs every op of the block through torch's selective-checkpoint
policy, a Python TorchDispatchMode, in forward and again in backward's recomputation: on an H200 this made
Llama-3.2-1B at micro-batch 1 run 1.7x slower than without recompute, where the device work alone predicts
1.06x (benchmarks/results/gpu_one_h200.md).

Measured here: the first block of the profiled model wrapped as the executor wraps it (executor.recompute),
fed a micro-batch of TOKENS tokens, so small that the device finishes each kernel before the host issues
the next: the wall time of forward + backward, synchronised once after `repeats` back-to-back calls, is the
host's issue time (the median of ROUNDS rounds, the modes interleaved). The cost model (costmodel.layers: Coster.layers_cost) takes max(device, host) per block.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from autoplan.profiler.timing import sync

TOKENS = 16
MODES = ("none", "selective", "full")
ROUNDS = 3


def measure_host_blocks(module: nn.Module, block: nn.Module, *, vocab: int, device: torch.device, repeats: int,
                        block_inputs) -> dict:
    """{"none": s, "selective": s, "full": s, "tokens": TOKENS}: seconds the host takes to issue `block`'s
    forward and backward under each recompute mode. `block_inputs(module, [block], tokens)` gives the
    (args, kwargs) the block receives for `tokens` (profiler.blocks.block_inputs)."""
    from autoplan.executor.recompute import apply_recompute

    tokens = torch.randint(0, vocab, (1, TOKENS), device=device)
    (args, kwargs), = block_inputs(module, [block], tokens)
    wrapped = {}
    for mode in MODES:
        holder = nn.Module()
        holder.layers = nn.ModuleDict({"0": copy.deepcopy(block)})
        apply_recompute(holder, mode)
        wrapped[mode] = holder.layers["0"]
    samples = {mode: [] for mode in MODES}
    for _ in range(ROUNDS):  # interleaved, so that a slow moment of the host is not one mode's alone
        for mode in MODES:
            samples[mode].append(_issue_s(wrapped[mode], args, kwargs, device=device, repeats=repeats))
    return {"tokens": TOKENS, "repeats": repeats, "rounds": ROUNDS,
            **{mode: statistics.median(values) for mode, values in samples.items()}}


def _issue_s(block: nn.Module, args, kwargs, *, device: torch.device, repeats: int) -> float:
    def leaf(x):
        return x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x

    def once():
        out = block(*[leaf(x) for x in args], **{k: leaf(v) for k, v in kwargs.items()})
        out = out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))
        out.backward(torch.ones_like(out))

    for _ in range(3):
        once()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    sync(device)
    return (time.perf_counter() - start) / repeats
