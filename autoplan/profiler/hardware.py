"""Kernel and collective micro-benchmarks on the real machine -> raw measurements (plain dicts) that
`calibrate` fits into a Cluster.

CUDA when present (bf16, timed with torch.cuda.Event), else CPU (float32, timed with time.perf_counter:
CPUs without AVX512-BF16/AMX run bf16 GEMMs 50x slower than fp32, ~1 GFLOP/s on this project's AMD EPYC
VM, so fp32 is what a CPU job trains in). What is measured:
- GEMMs: square (s, s, s) and tensor-parallel shapes (s, s/tp, s) column-, (s, s, s/tp) row-parallel;
- memory bandwidth: copy and add of a buffer larger than the last-level cache, plus gelu and layer_norm
  (the elementwise/normalisation kernels the cost model prices at "memory-bound efficiency");
- attention: F.scaled_dot_product_attention, causal, forward + backward;
- the optimizer step the executor runs (AdamW) over a few million parameters;
- collectives (under a process group): all_reduce, all_gather, reduce_scatter, all_to_all and a send/recv
  ping-pong, on the world group and, across several nodes, on intra-node and cross-node groups;

The timing protocol: profiler.timing; a model's blocks: profiler.blocks; the whole profile run (settings,
device, progress, `python -m autoplan.profiler.session`): profiler.session.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autoplan.profiler.timing import Progress, comm_device, distributed, no_progress, stats, time_s

COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
# flop_counter's convention for SDPA (torch/utils/flop_counter.py, sdpa_flop_count and
# sdpa_backward_flop_count): forward QK^T and PV are 2 GEMMs of 2·b·h·s²·d FLOPs -> 4·b·h·s²·d;
# backward recomputes nothing in the count and runs 5 such GEMMs -> 2.5x the forward.
SDPA_BWD_FACTOR = 2.5


# ----------------------------------------------------------------------------------------- compute
def gemm_shapes(base_sizes: Sequence[int], tp_degrees: Sequence[int] = (2, 4, 8)) -> list[tuple[int, int, int]]:
    """(m, n, k) for each size s: square (s, s, s), then per tp degree the column-parallel (s, s/tp, s)
    and row-parallel (s, s, s/tp) shards that tensor parallelism leaves on one GPU."""
    shapes = []
    for s in base_sizes:
        shapes.append((s, s, s))
        shapes += [shape for tp in tp_degrees if s % tp == 0 for shape in ((s, s // tp, s), (s, s, s // tp))]
    return shapes


def measure_gemm_curve(*, dtype: torch.dtype, sizes: Sequence[int | tuple[int, int, int]], repeats: int,
                       device: torch.device | str, progress: Progress = no_progress) -> list[dict]:
    """Time (m x k) @ (k x n) for each size (an int s means (s, s, s)); FLOPs = 2·m·n·k."""
    device = torch.device(device)
    entries = []
    for size in sizes:
        m, n, k = (size, size, size) if isinstance(size, int) else size
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        out = torch.empty(m, n, dtype=dtype, device=device)
        samples, inner = time_s(lambda: torch.mm(a, b, out=out), device=device, repeats=repeats)
        flops = 2.0 * m * n * k
        entry = {"m": m, "n": n, "k": k, "flops": flops, "dtype": str(dtype).removeprefix("torch."),
                 "inner": inner, **stats(samples)}
        entry["achieved_flops_per_s"] = flops / entry["median_s"]
        entries.append(entry)
        progress(f"GEMM {m}x{n}x{k}")
        del a, b, out
    return entries


def measure_memory_bandwidth(*, dtype: torch.dtype, sizes_bytes: Sequence[int], repeats: int,
                             device: torch.device | str, progress: Progress = no_progress) -> list[dict]:
    """Bytes moved per second by copy (read + write: 2 x buffer), add (3 x), and the memory-bound kernels
    gelu and layer_norm over rows of 4096 (read + write: 2 x). Buffers should exceed the last-level cache."""
    device = torch.device(device)
    entries = []
    for size_bytes in sizes_bytes:
        numel = max(4096, size_bytes // (torch.finfo(dtype).bits // 8) // 4096 * 4096)  # whole rows of 4096
        x = torch.randn(numel, dtype=dtype, device=device)
        y, z = torch.empty_like(x), torch.empty_like(x)
        rows = x.view(-1, 4096)
        ops = {"copy": (lambda: y.copy_(x), 2), "add": (lambda: torch.add(x, y, out=z), 3),
               "gelu": (lambda: F.gelu(x), 2), "layer_norm": (lambda: F.layer_norm(rows, (4096,)), 2)}
        buffer_bytes = numel * x.element_size()
        for op, (fn, buffers_moved) in ops.items():
            samples, inner = time_s(fn, device=device, repeats=repeats)
            entry = {"op": op, "bytes": buffer_bytes, "bytes_moved": buffers_moved * buffer_bytes,
                     "dtype": str(dtype).removeprefix("torch."), "inner": inner, **stats(samples)}
            entry["achieved_bytes_per_s"] = entry["bytes_moved"] / entry["median_s"]
            entries.append(entry)
            progress(f"memory {op} {buffer_bytes / 2**20:.0f} MiB")
        del x, y, z, rows
    return entries


def measure_optimizer(*, dtype: torch.dtype, numel: int, repeats: int, device: torch.device | str,
                      progress: Progress = no_progress) -> list[dict]:
    """Seconds of one optimizer step of the executor (executor.data_parallel.build_optimizer: AdamW, with fp32
    master weights for low-precision parameters) over `numel` parameters of `dtype` in 8 tensors, gradients set.
    The cost model prices the step as bytes per parameter over the memory bandwidth; this is what it reaches."""
    from torch import nn

    from autoplan.executor.data_parallel import build_optimizer

    device = torch.device(device)
    params = nn.ParameterList(nn.Parameter(torch.randn(numel // 8, dtype=dtype, device=device)) for _ in range(8))
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = build_optimizer(params, zero_stage=0, dp_mesh=None, lr=1e-4, weight_decay=0.1,
                                master_weights=dtype in (torch.bfloat16, torch.float16))
    samples, inner = time_s(optimizer.step, device=device, repeats=repeats)
    progress(f"optimizer step {numel / 1e6:.0f}M parameters")
    entry = {"params": 8 * (numel // 8), "dtype": str(dtype).removeprefix("torch."), "inner": inner,
             "optimizer": type(optimizer).__name__, **stats(samples)}
    del optimizer, params
    return [entry]


def measure_attention(*, dtype: torch.dtype, shapes: Sequence[tuple[int, int, int, int]], repeats: int,
                      device: torch.device | str, progress: Progress = no_progress) -> list[dict]:
    """Causal F.scaled_dot_product_attention forward + backward for (batch, heads, seq, head_dim) shapes.
    `flops` counts as torch.utils.flop_counter does: 4·b·h·s²·d forward x (1 + 2.5) with backward,
    without the causal mask's saving (the cost model applies that fraction)."""
    device = torch.device(device)
    entries = []
    for b, h, s, d in shapes:
        q, k, v = (torch.randn(b, h, s, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, s, d, dtype=dtype, device=device)

        def fwd_bwd():  # autograd.grad: no accumulation into .grad (an extra elementwise add) is timed
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad)

        samples, inner = time_s(fwd_bwd, device=device, repeats=repeats)
        flops = 4.0 * b * h * s * s * d * (1 + SDPA_BWD_FACTOR)
        entries.append({"batch": b, "heads": h, "seq_len": s, "head_dim": d, "causal": True, "flops": flops,
                        "dtype": str(dtype).removeprefix("torch."), "inner": inner, **stats(samples)})
        progress(f"attention b={b} h={h} s={s} d={d}")
        del q, k, v, grad
    return entries


# ----------------------------------------------------------------------------------------- collectives
@dataclass(frozen=True)
class CommGroup:
    """The group of one kind ("world", "intra", "inter") that this rank belongs to, with its global ranks."""

    kind: str
    group: object  # a ProcessGroup; None is the world group
    ranks: tuple[int, ...]


def comm_groups() -> list[CommGroup]:
    """The world group; with several nodes (torchrun's LOCAL_WORLD_SIZE < WORLD_SIZE) also the group of
    this rank's node ("intra") and the group of the ranks with its local index on every node ("inter").
    Every rank creates every subgroup, in the same order, as torch.distributed requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    groups = [CommGroup("world", None, tuple(range(world)))]
    if local >= world or world % local:
        return groups
    intra = [list(range(node * local, (node + 1) * local)) for node in range(world // local)]
    inter = [list(range(index, world, local)) for index in range(local)]
    if local > 1:
        mine, _ = dist.new_subgroups_by_enumeration(intra)
        groups.append(CommGroup("intra", mine, tuple(intra[rank // local])))
    mine, _ = dist.new_subgroups_by_enumeration(inter)
    groups.append(CommGroup("inter", mine, tuple(inter[rank % local])))
    return groups


def _collective(op: str, *, cg: CommGroup, numel: int, dtype: torch.dtype, device: torch.device):
    """(the call, bytes M as costmodel.comm defines it, note). M: the full buffer (all_reduce), the full
    gathered output (all_gather), the full input (reduce_scatter), all a rank sends (all_to_all), the
    message (p2p, timed as half a ping-pong between the group's first two ranks)."""
    n, group, rank = len(cg.ranks), cg.group, dist.get_rank()
    full = torch.ones(numel, dtype=dtype, device=device)
    shard = torch.ones(numel // n, dtype=dtype, device=device)
    nbytes = full.numel() * full.element_size()
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if op == "all_reduce":
        return (lambda: dist.all_reduce(full, group=group)), nbytes, None
    if op == "all_gather":
        return (lambda: all_gather(full, shard, group=group)), nbytes, None
    if op == "all_to_all":
        out = torch.empty_like(full)
        return (lambda: dist.all_to_all_single(out, full, group=group)), nbytes, None
    if op == "reduce_scatter":
        try:
            reduce_scatter(shard, full, group=group)
            return (lambda: reduce_scatter(shard, full, group=group)), nbytes, None
        except (RuntimeError, NotImplementedError):  # gloo before torch 2.6 has no reduce_scatter_tensor
            index = cg.ranks.index(rank)
            note = (f"emulated: {dist.get_backend()} lacks reduce_scatter_tensor, timed all_reduce + chunk "
                    "(an all_reduce's cost; excluded from the link fit)")

            def all_reduce_then_chunk():
                dist.all_reduce(full, group=group)
                shard.copy_(full.chunk(n)[index])
            return all_reduce_then_chunk, nbytes, note
    if op == "p2p":
        first, second = cg.ranks[0], cg.ranks[1]

        def ping_pong():
            if rank == first:
                dist.send(full, second), dist.recv(full, second)
            elif rank == second:
                dist.recv(full, first), dist.send(full, first)
        return ping_pong, nbytes, "one-way time = half a send/recv round trip between the group's first two ranks"
    raise ValueError(f"unknown collective {op!r}; known: {', '.join(COLLECTIVE_OPS)}")


def measure_collectives(*, sizes: Sequence[int], repeats: int, ops: Sequence[str] = COLLECTIVE_OPS,
                        dtype: torch.dtype | None = None, groups: Sequence[CommGroup] | None = None,
                        progress: Progress = no_progress) -> list[dict]:
    """Time each op at each message size (bytes) on each group kind, under an initialised process group.
    Every rank must call this; each statistic is the max over ranks of that rank's median."""
    if not distributed():
        raise RuntimeError("measure_collectives needs an initialised process group with 2 or more ranks")
    device = comm_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    elem_bytes = torch.finfo(dtype).bits // 8
    entries = []
    for cg in groups or comm_groups():
        n = len(cg.ranks)
        for op in ops:
            for size_bytes in sizes:
                numel = max(n, size_bytes // elem_bytes // n * n)
                fn, nbytes, note = _collective(op, cg=cg, numel=numel, dtype=dtype, device=device)
                samples, inner = time_s(fn, device=device, repeats=repeats, collective=True)
                if op == "p2p":
                    samples = [s / 2 for s in samples]
                entry = {"op": op, "group": cg.kind, "group_size": 2 if op == "p2p" else n, "bytes": nbytes,
                         "backend": str(dist.get_backend()), "dtype": str(dtype).removeprefix("torch."),
                         "inner": inner, "emulated": bool(note and note.startswith("emulated")), "note": note,
                         **stats(samples)}
                entries.append(entry)
                progress(f"{op} {cg.kind} n={n} {nbytes / 2**20:.2f} MiB")
    return entries
