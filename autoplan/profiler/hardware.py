"""Micro-benchmarks on the real machine -> raw measurements (plain dicts) that `calibrate` fits into a Cluster.

CUDA when present (bf16, timed with torch.cuda.Event), else CPU (float32, timed with time.perf_counter:
CPUs without AVX512-BF16/AMX run bf16 GEMMs 50x slower than fp32, ~1 GFLOP/s on this project's AMD EPYC
VM, so fp32 is what a CPU job trains in). What is measured:
- GEMMs: square (s, s, s) and tensor-parallel shapes (s, s/tp, s) column-, (s, s, s/tp) row-parallel;
- memory bandwidth: copy and add of a buffer larger than the last-level cache, plus gelu and layer_norm
  (the elementwise/normalisation kernels the cost model prices at "memory-bound efficiency");
- attention: F.scaled_dot_product_attention, causal, forward + backward;
- collectives (under a process group): all_reduce, all_gather, reduce_scatter, all_to_all and a send/recv
  ping-pong, on the world group and, across several nodes, on intra-node and cross-node groups;
- optionally the blocks of a small named model: forward/backward time and activation memory.

Timing protocol: `warmup` untimed calls, then `repeats` samples; a sample times `inner` back-to-back calls
and divides by `inner`, chosen so a sample lasts about MIN_SAMPLE_S (launch and timer overheads stay
small, as nccl-tests averages its iterations). Reported: the median and the spread (min, p25, p75, max)
of the samples. Under a process group every statistic is the max over ranks (all_reduce MAX): the
slowest rank sets the pace of a synchronous step.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

Progress = Callable[[str], None]  # called once per measured item with what was measured
COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
MIN_SAMPLE_S = {"cuda": 1e-3, "cpu": 2e-3}  # target length of one timed sample
MAX_INNER = 1000                            # calls per sample at most
# flop_counter's convention for SDPA (torch/utils/flop_counter.py, sdpa_flop_count and
# sdpa_backward_flop_count): forward QK^T and PV are 2 GEMMs of 2·b·h·s²·d FLOPs -> 4·b·h·s²·d;
# backward recomputes nothing in the count and runs 5 such GEMMs -> 2.5x the forward.
SDPA_BWD_FACTOR = 2.5


def _noop(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------- timing
def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    backend = str(dist.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def _sync(device: torch.device) -> None:
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
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def time_s(fn: Callable[[], object], *, device: torch.device, repeats: int, warmup: int = 2,
           collective: bool = False) -> tuple[list[float], int]:
    """(samples in seconds per call, calls per sample). `collective`: every rank calls fn together, so the
    calls per sample are agreed over ranks and each sample starts after a barrier."""
    for _ in range(warmup):
        fn()
    _sync(device)
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
                       device: torch.device | str, progress: Progress = _noop) -> list[dict]:
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
                             device: torch.device | str, progress: Progress = _noop) -> list[dict]:
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


def measure_attention(*, dtype: torch.dtype, shapes: Sequence[tuple[int, int, int, int]], repeats: int,
                      device: torch.device | str, progress: Progress = _noop) -> list[dict]:
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
                        progress: Progress = _noop) -> list[dict]:
    """Time each op at each message size (bytes) on each group kind, under an initialised process group.
    Every rank must call this; each statistic is the max over ranks of that rank's median."""
    if not distributed():
        raise RuntimeError("measure_collectives needs an initialised process group with 2 or more ranks")
    device = _comm_device()
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


# ----------------------------------------------------------------------------------------- model blocks
def measure_layers(model: str, *, device: torch.device | str, dtype: torch.dtype, micro_batch_sizes: Sequence[int],
                   repeats: int, progress: Progress = _noop, host: dict | None = None) -> list[dict]:
    """Forward and backward seconds of each block of `model` (a built-in name or a model.py whose blocks are
    `model.layers`) on real tensors, per micro-batch size; activation memory as the bytes autograd saves
    (saved_tensors_hooks, deduplicated by storage, parameters excluded) and, on CUDA, the peak allocated
    during one forward + backward (torch.cuda.max_memory_allocated above what was allocated before).
    `host` (a dict, CUDA only): filled with the host's issue time of the first block per recompute mode
    (profiler.host)."""
    from autoplan.errors import InvalidInputError
    from autoplan.models import load_model

    device = torch.device(device)
    loaded = load_model(model, device=device)
    module = loaded.module
    if hasattr(module, "init_weights"):
        module.init_weights(0)
    module.to(dtype)
    blocks = getattr(module, "layers", None)
    if not isinstance(blocks, (torch.nn.ModuleDict, torch.nn.ModuleList)):
        raise InvalidInputError(f"{model}: measuring layers needs the model's blocks in `.layers` "
                                "(a ModuleDict or ModuleList)")
    named = list(blocks.items()) if isinstance(blocks, torch.nn.ModuleDict) else list(enumerate(blocks))
    seq_len, vocab = loaded.seq_len or 128, loaded.config.get("vocab", 2)
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    entries = []
    for mbs in micro_batch_sizes:
        tokens = torch.randint(0, vocab, (mbs, seq_len), device=device)
        inputs = _block_inputs(module, [block for _, block in named], tokens)
        for (name, block), (args, kwargs) in zip(named, inputs):
            timed = _time_block(block, args, kwargs, device=device, repeats=repeats, param_storages=param_storages)
            entries.append({"model": loaded.name, "layer": f"layers.{name}", "micro_batch_size": mbs,
                            "seq_len": seq_len, "dtype": str(dtype).removeprefix("torch."), **timed})
        progress(f"{loaded.name} blocks, micro-batch {mbs}")
    if host is not None and device.type == "cuda" and named:
        from autoplan.profiler.host import measure_host_blocks

        host.update(model=loaded.name, **measure_host_blocks(module, named[0][1], vocab=vocab, device=device,
                                                             repeats=repeats, block_inputs=_block_inputs))
    return entries


def _block_inputs(module: torch.nn.Module, blocks: list, tokens: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each block receives in one no-grad forward of the whole model."""
    captured: list[tuple[tuple, dict]] = []
    hooks = [block.register_forward_pre_hook(lambda _, args, kwargs: captured.append((args, kwargs)),
                                             with_kwargs=True) for block in blocks]
    try:
        with torch.no_grad():
            module(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _time_block(block, args, kwargs, *, device, repeats: int, param_storages: set) -> dict:
    def leaf(x):
        return x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    fwd_s, bwd_s, peak_bytes, result = [], [], None, {}
    for i in range(1 + repeats):  # the first pass is a warm-up that also counts saved bytes and the peak
        a, kw = [leaf(x) for x in args], {k: leaf(v) for k, v in kwargs.items()}
        if device.type == "cuda" and i == 0:
            torch.cuda.reset_peak_memory_stats(device)
            allocated_bytes = torch.cuda.memory_allocated(device)
        with torch.autograd.graph.saved_tensors_hooks(pack if i == 0 else (lambda t: t), lambda t: t):
            f = sample_s(lambda: result.update(out=block(*a, **kw)), device=device)
        out = result.pop("out")
        out = out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))
        b = sample_s(lambda: out.backward(torch.ones_like(out)), device=device)
        if i == 0 and device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated(device) - allocated_bytes
        elif i > 0:
            fwd_s.append(f), bwd_s.append(b)
        del out
    fwd, bwd = stats(fwd_s), stats(bwd_s)
    return {"fwd_median_s": fwd["median_s"], "fwd_spread": fwd["spread"], "bwd_median_s": bwd["median_s"],
            "bwd_spread": bwd["spread"], "repeats": repeats, "saved_activation_bytes": sum(saved.values()),
            "peak_bytes": peak_bytes}


# ----------------------------------------------------------------------------------------- a whole profile
@dataclass(frozen=True)
class ProfileSettings:
    """What one profile measures. Default: about two minutes on a GPU node; quick: seconds."""

    dtype: torch.dtype
    gemm_shapes: tuple[tuple[int, int, int], ...]
    memory_sizes_bytes: tuple[int, ...]
    attention_shapes: tuple[tuple[int, int, int, int], ...]  # (batch, heads, seq_len, head_dim)
    collective_sizes_bytes: tuple[int, ...]
    layer_micro_batch_sizes: tuple[int, ...]
    repeats: int

    @classmethod
    def for_device(cls, device: torch.device, *, quick: bool) -> ProfileSettings:
        if device.type == "cuda":
            return cls(torch.bfloat16,
                       tuple(gemm_shapes([512, 2048, 8192], (8,)) if quick else
                             gemm_shapes([256, 512, 1024, 2048, 4096, 8192])),
                       (2**28,) if quick else (2**28, 2**30),
                       ((4, 16, 2048, 128),) if quick else ((4, 16, 2048, 128), (1, 32, 8192, 128)),
                       (2**12, 2**20, 2**26) if quick else tuple(2**e for e in range(10, 30, 2)),
                       (1,) if quick else (1, 2, 4), 5 if quick else 20)
        # CPU: buffers of 32-64 MiB exceed a typical 32 MiB L3; GEMMs up to 2048 (0.3 s at 60 GFLOP/s).
        return cls(torch.float32,
                   tuple(gemm_shapes([64, 256, 512], (2,)) if quick else gemm_shapes([128, 256, 512, 1024, 2048])),
                   (2**25,) if quick else (2**26,),
                   ((1, 4, 256, 64),) if quick else ((1, 8, 512, 64), (1, 8, 1024, 64)),
                   (2**10, 2**16, 2**20) if quick else tuple(2**e for e in range(10, 26, 2)),
                   (1,) if quick else (1, 2), 3 if quick else 7)


def init_distributed_from_env() -> bool:
    """Initialise the default process group from torchrun's environment (nccl on CUDA, gloo on CPU) if
    torchrun variables are present and no group exists yet. True if this call created it."""
    if not dist.is_available() or dist.is_initialized():
        return False
    if not all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def profile_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def device_info(device: torch.device) -> dict:
    """Name and memory of the device this rank profiles. CUDA: total memory from get_device_properties and
    `context_bytes` = used (mem_get_info) minus what torch's allocator holds: the CUDA context, NCCL buffers
    and other processes. CPU: physical RAM (os.sysconf) shared by the ranks of this node."""
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "ranks_per_node": ranks_per_node,
                "memory_bytes": torch.cuda.get_device_properties(device).total_memory,
                "context_bytes": max(0, total_bytes - free_bytes - torch.cuda.memory_reserved(device))}
    ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads(), "ranks_per_node": ranks_per_node,
            "ram_bytes": ram_bytes, "memory_bytes": ram_bytes // ranks_per_node}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)" if names else "CPU"
    except OSError:
        import platform
        return platform.processor() or "CPU"


def resident_bytes() -> int | None:
    """Resident set size of this process (Linux /proc/self/statm), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measure_all(settings: ProfileSettings, *, device: torch.device, model: str | None = None,
                show_progress: bool = True) -> dict:
    """Run every measurement of `settings` (collectives only under a process group of 2+ ranks; model
    blocks only with `model`) and return them as one JSON-ready dict with where and when they were taken."""
    import datetime
    import socket

    notes, rank = [], dist.get_rank() if distributed() else 0
    rss_bytes = resident_bytes()
    groups = comm_groups() if distributed() else []
    total = (len(settings.gemm_shapes) + 4 * len(settings.memory_sizes_bytes) + len(settings.attention_shapes)
             + sum(len(COLLECTIVE_OPS) for _ in groups) * len(settings.collective_sizes_bytes)
             + (len(settings.layer_micro_batch_sizes) if model else 0))
    common = dict(dtype=settings.dtype, repeats=settings.repeats, device=device)
    with _progress_bar(total, enabled=show_progress and rank == 0 and sys.stderr.isatty()) as progress:
        gemm = measure_gemm_curve(sizes=settings.gemm_shapes, progress=progress, **common)
        bandwidth = measure_memory_bandwidth(sizes_bytes=settings.memory_sizes_bytes, progress=progress, **common)
        attention = measure_attention(shapes=settings.attention_shapes, progress=progress, **common)
        collectives = []
        if groups:
            collectives = measure_collectives(sizes=settings.collective_sizes_bytes, repeats=settings.repeats,
                                              groups=groups, progress=progress)
        else:
            notes.append("single process (no process group of 2+ ranks): collectives not measured")
        layers, host = [], {}
        if model:
            layers = measure_layers(model, micro_batch_sizes=settings.layer_micro_batch_sizes, progress=progress,
                                    host=host, **common)
    info = device_info(device)
    info["rss_bytes"] = rss_bytes
    return {"host": socket.gethostname(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "device": info, "dtype": str(settings.dtype).removeprefix("torch."),
            "repeats": settings.repeats, "world_size": dist.get_world_size() if distributed() else 1,
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "gemm": gemm, "bandwidth": bandwidth,
            "attention": attention, "collectives": collectives, "layers": layers, "host_blocks": host, "notes": notes}


class _progress_bar:
    """A rich progress bar on stderr (rank 0, TTY only); yields a `progress(description)` callable."""

    def __init__(self, total: int, *, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self) -> Progress:
        if not self.enabled:
            self.bar = None
            return _noop
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        self.bar = Bar(TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("", total=self.total)
        return lambda what: self.bar.update(task, advance=1, description=what)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m autoplan.profiler.hardware [MODEL] --out cluster.json [--quick]`, alone or under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m autoplan.profiler.hardware",
                                     description="Measure this machine (and its interconnect under torchrun) "
                                                 "and write a Cluster JSON file.")
    parser.add_argument("model", nargs="?", default=None, help="also time the blocks of this model (e.g. gpt-tiny)")
    parser.add_argument("--out", default=None, help="where rank 0 writes the Cluster JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: seconds, not minutes")
    parser.add_argument("--name", default=None, help="label of the measured cluster")
    parser.add_argument("--peak-flops", type=float, default=None, help="declared peak FLOP/s of one device")
    args = parser.parse_args(argv)

    from autoplan.errors import AutoplanError
    from autoplan.profiler.calibrate import run_profile, summary

    try:
        cluster = run_profile(out=args.out, quick=args.quick, model=args.model, name=args.name,
                              peak_flops_per_s=args.peak_flops)
    except AutoplanError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if os.environ.get("RANK", "0") == "0":
        print(summary(cluster) + (f"\nwrote {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
