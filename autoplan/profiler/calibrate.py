"""Measurements (profiler.hardware, profiler.blocks) -> Cluster: the GEMM efficiency curve, the links'
alpha-beta, the rest; and the per-call overheads fitted to measured runs (`autoplan calibrate`).

Fitting is plain functions over the measurement dicts (no torch), so they are tested on synthetic data;
the whole job that `autoplan profile` runs (measure, fit, write the Cluster file) is profiler.session.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoplan.errors import InvalidInputError
from autoplan.schema import Cluster, EfficiencyPoint, Link, Stack

# (substring of torch.cuda.get_device_name, dense bf16 FLOP/s, source); most specific first.
PEAK_FLOPS_PER_S = (
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe datasheet: BF16 1,513 TFLOPS with sparsity -> 756 dense"),
    ("H100", 989e12, "NVIDIA H100 SXM datasheet: BF16 1,979 TFLOPS with sparsity -> 989 dense"),
    ("H200", 989e12, "NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity -> 989 dense (same tensor cores as H100 SXM)"),
    ("A100", 312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense"),
)
# Preset whose unmeasured numbers (attention efficiency, a link not measured) a CUDA profile falls back on.
BASE_PRESETS = (("H100", "dgx-h100"), ("H200", "dgx-h200"), ("A100", "dgx-a100-80gb"))
# memory_reserve_bytes on CUDA = measured context (CUDA context + NCCL buffers + other processes, from
# mem_get_info after the collectives ran) + this allowance for caching-allocator fragmentation, which has
# no universal value; 2 GiB is the budget the dgx presets use (see their memory_reserve_bytes.method).
ALLOCATOR_ALLOWANCE_BYTES = 2 * 2**30
# On CPU the reserve is the resident size of the profiling process before its benchmarks allocated
# (interpreter + torch libraries, ~0.3-0.5 GiB); this when /proc is unavailable.
CPU_RESERVE_FALLBACK_BYTES = 512 * 2**20
# Flash attention with a causal mask runs half of the FLOPs the flop counter counts; must equal
# autoplan.costmodel.compute.CAUSAL_ATTENTION_WORK_FRACTION (Dao 2023, Sec. 3.1.1), which prices it.
CAUSAL_WORK_FRACTION = 0.5
# Unmeasured and no base cluster: judgement defaults, as in the dgx-h100 preset (FA2-class attention).
DEFAULT_ATTENTION_EFFICIENCY = 0.4
DEFAULT_MEMORY_BOUND_EFFICIENCY = 0.8
# No collectives measured (one process) and no base: the link is a placeholder, the measured memory-copy
# bandwidth and this latency, an optimistic guess for ranks exchanging through shared memory.
PLACEHOLDER_LATENCY_S = 1e-5
GEMM_CURVE_POINTS = 8
MIN_EFFICIENCY = 1e-6


# ----------------------------------------------------------------------------------------- GEMM curve
def isotonic_increasing(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool-adjacent-violators; Barlow et al. 1972)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (v2, w2, c2), (v1, w1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [mean for mean, _, count in blocks for _ in range(int(count))]


def fit_gemm_curve(points: Sequence[dict], *, peak_flops_per_s: float | None = None,
                   max_points: int = GEMM_CURVE_POINTS) -> list[EfficiencyPoint]:
    """Efficiency = achieved / peak against GEMM FLOPs, made non-decreasing in FLOPs by an isotonic fit
    (GEMMs of equal FLOPs, e.g. tensor-parallel shapes, are averaged first), sampled at up to `max_points`
    FLOPs spaced evenly in log FLOPs, clipped to (0, 1]. Peak: the declared one, else the best achieved
    rate (efficiency relative to this machine's best GEMM). Ignores shape beyond FLOPs, as the cost model
    does (it interpolates in log FLOPs)."""
    if not points:
        raise InvalidInputError("no GEMM measurements to fit an efficiency curve to")
    peak = peak_flops_per_s or max(p["achieved_flops_per_s"] for p in points)
    by_flops: dict[float, list[float]] = {}
    for p in points:
        by_flops.setdefault(float(p["flops"]), []).append(p["achieved_flops_per_s"] / peak)
    flops = sorted(by_flops)
    fitted = isotonic_increasing([float(np.mean(by_flops[f])) for f in flops], [len(by_flops[f]) for f in flops])
    keep = sorted({int(np.argmin(np.abs(np.log(flops) - math.log(target))))
                   for target in np.geomspace(flops[0], flops[-1], min(max_points, len(flops)))})
    return [EfficiencyPoint(flops=flops[i], efficiency=min(1.0, max(MIN_EFFICIENCY, fitted[i]))) for i in keep]


# ----------------------------------------------------------------------------------------- links
def ring_model(op: str, group_size: int) -> tuple[int, float]:
    """(latency steps, fraction of M each rank sends) of the algorithm costmodel.comm prices `op` with:
    all_reduce 2(n-1) steps, 2(n-1)/n·M (ring reduce-scatter + all-gather); all_gather, reduce_scatter
    n-1 steps, (n-1)/n·M (ring); all_to_all n-1 steps, (n-1)/n·M (pairwise exchange); p2p 1 step, M
    (Thakur, Rabenseifner & Gropp 2005). The fractions are NCCL's busbw/algbw factors (nccl-tests
    doc/PERFORMANCE.md), so the fitted bandwidth is NCCL's bus bandwidth."""
    n = group_size
    if op == "all_reduce":
        return 2 * (n - 1), 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return n - 1, (n - 1) / n
    if op == "p2p":
        return 1, 1.0
    raise ValueError(f"no ring model for {op!r}")


@dataclass(frozen=True)
class LinkFit:
    link: Link
    points: int
    max_relative_error: float
    notes: tuple[str, ...] = ()


def fit_link(points: Sequence[dict]) -> Link:
    """Alpha-beta link fitted to measured collectives; see `fit_link_detailed`."""
    return fit_link_detailed(points).link


def fit_link_detailed(points: Sequence[dict]) -> LinkFit:
    """Least squares for (α, B) in t_i = steps_i·α + traffic_i·M_i / B over measured (op, group_size,
    bytes M_i, median_s t_i), with steps and traffic from `ring_model` (the same formulas costmodel.comm
    prices collectives with, so a fitted link reproduces the measurements there). Each residual is
    relative (divided by t_i), so small messages (latency) and large ones (bandwidth) weigh alike.
    Emulated entries (gloo's reduce_scatter as all_reduce) are left out. Clamps: α < 0 -> 0 and B refitted
    through the origin; B <= 0 -> the largest message's traffic / time. Each clamp is named in `notes`."""
    rows = [p for p in points if not p.get("emulated") and p.get("group_size", 0) >= 2]
    if not rows:
        raise InvalidInputError("no collective measurements to fit a link to")
    model = [ring_model(p["op"], p["group_size"]) for p in rows]
    steps = np.array([s for s, _ in model], dtype=float)
    traffic_bytes = np.array([f * p["bytes"] for (_, f), p in zip(model, rows)], dtype=float)
    time_s = np.array([p["median_s"] for p in rows], dtype=float)
    design = np.stack([steps, traffic_bytes], axis=1) / time_s[:, None]  # relative residuals: rows / t_i
    (latency_s, s_per_byte), *_ = np.linalg.lstsq(design, np.ones(len(rows)), rcond=None)
    notes = []
    if latency_s < 0:
        notes.append(f"fitted latency {latency_s:.3g} s < 0: clamped to 0, bandwidth refitted")
        latency_s, ratio = 0.0, traffic_bytes / time_s
        s_per_byte = ratio.sum() / (ratio ** 2).sum()
    if s_per_byte <= 0:
        largest = int(np.argmax(traffic_bytes))
        s_per_byte = time_s[largest] / traffic_bytes[largest]
        notes.append("fitted bandwidth <= 0 (latency-bound sizes only?): used the largest message's traffic/time")
    predicted_s = steps * latency_s + traffic_bytes * s_per_byte
    error = float(np.max(np.abs(predicted_s - time_s) / time_s))
    return LinkFit(Link(bandwidth_bytes_per_s=float(1 / s_per_byte), latency_s=float(latency_s)), len(rows),
                   error, tuple(notes))


def _link_source(fit: LinkFit, rows: Sequence[dict], kind: str, where: str) -> str:
    ops = ", ".join(sorted({p["op"] for p in rows if not p.get("emulated")}))
    sizes = sorted({p["group_size"] for p in rows})
    nbytes = [p["bytes"] for p in rows]
    text = (f"{where}; alpha-beta least squares (relative residuals) over {fit.points} points ({ops}) on the "
            f"{kind} group (n={','.join(map(str, sizes))}), {min(nbytes)}-{max(nbytes)} bytes, each converted "
            f"to the ring model's per-rank traffic (Thakur, Rabenseifner & Gropp 2005); bandwidth is NCCL's "
            f"bus bandwidth; worst relative misfit {fit.max_relative_error:.0%}")
    return "; ".join([text, *fit.notes])


def _links(measurements: dict, *, base: Cluster | None, bandwidth_bytes_per_s: float, where: str):
    """(intra_node, inter_node, sources) from the collectives: intra from the intra-node group (the world
    group on one node), inter from the cross-node group; what was not measured comes from `base`."""
    collectives = measurements.get("collectives") or []
    inter_rows = [p for p in collectives if p["group"] == "inter"]
    intra_rows = [p for p in collectives if p["group"] == "intra"] or \
        ([p for p in collectives if p["group"] == "world"] if not inter_rows else [])
    sources = {}
    if intra_rows:
        fit = fit_link_detailed(intra_rows)
        intra, sources["intra_node"] = fit.link, _link_source(fit, intra_rows, intra_rows[0]["group"], where)
    elif base is not None:
        intra, sources["intra_node"] = base.intra_node, f"not measured (one process or one rank per node): from {base.name}"
    else:
        intra = Link(bandwidth_bytes_per_s=bandwidth_bytes_per_s, latency_s=PLACEHOLDER_LATENCY_S)
        sources["intra_node"] = ("not measured (one process; run under torchrun to measure): placeholder = "
                                 f"measured memory-copy bandwidth, {PLACEHOLDER_LATENCY_S:g} s latency")
    if inter_rows:
        fit = fit_link_detailed(inter_rows)
        inter, sources["inter_node"] = fit.link, _link_source(fit, inter_rows, "inter", where)
    elif base is not None:
        inter, sources["inter_node"] = base.inter_node, f"not measured (one node): from {base.name}"
    else:
        inter, sources["inter_node"] = intra, "not measured (one node): the same as intra_node"
    return intra, inter, sources


# ----------------------------------------------------------------------------------------- the cluster
def _peak(measurements: dict, declared: float | None) -> tuple[float, str]:
    device = measurements.get("device", {})
    if declared:
        return declared, "declared by the user"
    if device.get("type") == "cuda":
        for key, peak, source in PEAK_FLOPS_PER_S:
            if key in device.get("name", ""):
                return peak, source
    best = max(p["achieved_flops_per_s"] for p in measurements["gemm"])
    return best, (f"no datasheet peak for {device.get('name', 'this device')!r}: the best achieved "
                  f"{measurements.get('dtype', '')} GEMM rate (efficiencies are relative to it)")


def _memory(measurements: dict, *, base: Cluster | None, where: str) -> tuple[float, float, dict]:
    """(bandwidth from the largest copy, memory-bound efficiency = median of gelu/layer_norm rates over the
    copy rate of the same buffer, sources)."""
    rows = measurements.get("bandwidth") or []
    copies = [p for p in rows if p["op"] == "copy"]
    if not copies:
        if base is None:
            raise InvalidInputError("no memory-bandwidth measurements and no base cluster")
        note = f"not measured: from {base.name}"
        return base.memory_bandwidth_bytes_per_s, base.memory_bound_efficiency, \
            {"memory_bandwidth_bytes_per_s": note, "memory_bound_efficiency": note}
    copy = max(copies, key=lambda p: (p["bytes"], p["achieved_bytes_per_s"]))
    bandwidth = copy["achieved_bytes_per_s"]
    sources = {"memory_bandwidth_bytes_per_s": f"{where}; tensor copy of {copy['bytes']} bytes, "
                                               "read + write bytes / median time"}
    kernels = [p["achieved_bytes_per_s"] for p in rows
               if p["op"] in ("gelu", "layer_norm") and p["bytes"] == copy["bytes"]]
    if kernels:
        efficiency = min(1.0, max(MIN_EFFICIENCY, float(np.median(kernels)) / bandwidth))
        sources["memory_bound_efficiency"] = (f"{where}; median of gelu and layer_norm bytes moved per second "
                                              "over the copy bandwidth, same buffer")
    elif base is not None:
        efficiency, sources["memory_bound_efficiency"] = base.memory_bound_efficiency, f"not measured: from {base.name}"
    else:
        efficiency, sources["memory_bound_efficiency"] = DEFAULT_MEMORY_BOUND_EFFICIENCY, "not measured: default"
    return bandwidth, efficiency, sources


def _streaming(measurements: dict, *, bandwidth: float, where: str) -> tuple[float | None, str]:
    """Cluster.streaming_efficiency: the add's bytes moved per second over the copy bandwidth (same buffer)."""
    rows = measurements.get("bandwidth") or []
    copies = [p for p in rows if p["op"] == "copy"]
    size = max(p["bytes"] for p in copies) if copies else None
    adds = [p["achieved_bytes_per_s"] for p in rows if p["op"] == "add" and p["bytes"] == size]
    if not adds:
        return None, "not measured: memory_bound_efficiency prices streaming ops"
    return min(1.0, max(MIN_EFFICIENCY, float(np.median(adds)) / bandwidth)), (
        f"{where}; an add's bytes moved per second (read 2, write 1 buffers) over the copy bandwidth, same buffer")


def _attention(measurements: dict, *, peak: float, base: Cluster | None, where: str) -> tuple[float, str]:
    rows = measurements.get("attention") or []
    if rows:
        row = max(rows, key=lambda p: p["flops"])
        efficiency = row["flops"] * CAUSAL_WORK_FRACTION / (peak * row["median_s"])
        return min(1.0, max(MIN_EFFICIENCY, efficiency)), (
            f"{where}; causal F.scaled_dot_product_attention fwd+bwd, b={row['batch']} heads={row['heads']} "
            f"s={row['seq_len']} d={row['head_dim']}: flop-counter FLOPs x {CAUSAL_WORK_FRACTION} (causal) / "
            "(peak x time)")
    if base is not None:
        return base.attention_efficiency, f"not measured: from {base.name}"
    return DEFAULT_ATTENTION_EFFICIENCY, "not measured: default (FlashAttention-2 class, as the dgx presets)"


def _optimizer(measurements: dict, *, bandwidth: float, where: str) -> tuple[float | None, str]:
    """Cluster.optimizer_efficiency: the executor's stack's optimizer bytes per parameter (Stack "torch") over
    the measured seconds per parameter and the copy bandwidth; None where the step was not measured."""
    rows = measurements.get("optimizer") or []
    if not rows:
        return None, "not measured: memory_bound_efficiency prices the optimizer step"
    row = rows[0]
    step_bytes = Stack.preset("torch").optimizer_step_bytes
    efficiency = step_bytes * row["params"] / (row["median_s"] * bandwidth)
    return min(8.0, max(MIN_EFFICIENCY, efficiency)), (
        f"{where}; the executor's {row['optimizer']} step over {row['params']} {row['dtype']} parameters: "
        f"{step_bytes:g} bytes per parameter (Stack 'torch') / (time x copy bandwidth)")


def _reserve(device: dict) -> tuple[int, str]:
    if device.get("type") == "cuda":
        context = int(device.get("context_bytes", 0))
        return context + ALLOCATOR_ALLOWANCE_BYTES, (
            f"measured CUDA context + NCCL buffers ({context} bytes: used minus torch-reserved, mem_get_info "
            f"after the collectives) + {ALLOCATOR_ALLOWANCE_BYTES} bytes allowance for allocator fragmentation")
    rss = device.get("rss_bytes")
    if rss:
        return int(rss), "resident size of the profiling process before its benchmarks (interpreter + torch)"
    return CPU_RESERVE_FALLBACK_BYTES, "CPU: 512 MiB for the interpreter and torch (not measured)"


def calibrated_cluster(*, name: str, measurements: dict, gpus_per_node: int, num_gpus: int,
                       peak_flops_per_s: float | None = None, memory_bytes: int | None = None,
                       base: Cluster | None = None) -> Cluster:
    """A Cluster fitted to `measurements` (as profiler.session.measure_all returns them); numbers not
    measured come from `base` (or documented defaults), and `sources` says which is which."""
    device = measurements.get("device", {})
    where = (f"measured on {measurements.get('host', '?')} {measurements.get('date', '?')}, median of "
             f"{measurements.get('repeats', '?')} repeats")
    peak, peak_source = _peak(measurements, peak_flops_per_s)
    curve = fit_gemm_curve(measurements.get("gemm") or [], peak_flops_per_s=peak)
    bandwidth, memory_bound, sources = _memory(measurements, base=base, where=where)
    intra, inter, link_sources = _links(measurements, base=base, bandwidth_bytes_per_s=bandwidth, where=where)
    attention, sources["attention_efficiency"] = _attention(measurements, peak=peak, base=base, where=where)
    reserve, sources["memory_reserve_bytes"] = _reserve(device)
    optimizer, sources["optimizer_efficiency"] = _optimizer(measurements, bandwidth=bandwidth, where=where)
    streaming, sources["streaming_efficiency"] = _streaming(measurements, bandwidth=bandwidth, where=where)
    memory = memory_bytes or device.get("memory_bytes") or (base.memory_bytes if base else None)
    if not memory:
        raise InvalidInputError("memory_bytes: not measured and not given")
    gemm_rows = measurements.get("gemm") or []
    sources.update(link_sources)
    sources.update({
        "peak_flops_per_s": peak_source,
        "memory_bytes": "declared by the user" if memory_bytes else (
            "torch.cuda.get_device_properties total_memory" if device.get("type") == "cuda"
            else f"physical RAM (os.sysconf) / {device.get('ranks_per_node', 1)} ranks on the node"),
        "gemm_efficiency": (f"{where}; {len(gemm_rows)} {measurements.get('dtype', '')} GEMMs (square and "
                            "tensor-parallel shapes), achieved / peak, isotonic in FLOPs"),
        "gpus_per_node": "ranks per node of the profiling run (torchrun LOCAL_WORLD_SIZE)",
        "num_gpus": "ranks of the profiling run; Cluster.with_gpus(n) resizes it",
    })
    sources.update({f"note.{i}": note for i, note in enumerate(measurements.get("notes") or [])})
    if any(p["achieved_flops_per_s"] > peak for p in gemm_rows):
        sources["note.peak"] = "a GEMM ran faster than the declared peak: its efficiency is clipped to 1"
    cluster = Cluster(name=name, gpu=device.get("name", "unknown"), num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                      peak_flops_per_s=peak, memory_bytes=int(memory), memory_bandwidth_bytes_per_s=bandwidth,
                      memory_reserve_bytes=reserve, intra_node=intra, inter_node=inter, gemm_efficiency=curve,
                      attention_efficiency=attention, memory_bound_efficiency=memory_bound,
                      optimizer_efficiency=optimizer, streaming_efficiency=streaming, sources=sources,
                      measurements=measurements)
    host = measurements.get("host_blocks") or {}
    if all(isinstance(host.get(mode), (int, float)) for mode in ("none", "selective", "full")):
        cluster = cluster.model_copy(update={
            "host_block_s": {mode: float(host[mode]) for mode in ("none", "selective", "full")},
            "sources": {**cluster.sources, "host_block_s": f"measured: the host's issue time of one {host.get('model')} "
                        f"block's forward + backward at {host.get('tokens')} tokens (profiler.host)"}})
    return fit_layer_overhead(cluster, measurements.get("layers") or [])


def fit_layer_overhead(cluster: Cluster, rows: Sequence[dict]) -> Cluster:
    """`cluster` with layer_overhead_fwd_s / _bwd_s fitted to measured block times: for each measured block
    and micro-batch size, (measured - predicted by the kernels' work alone) / the block's traced layers; the
    median over the measurements, clamped at 0. Unchanged without layer measurements."""
    import torch

    from autoplan.costmodel.layers import layer_cost
    from autoplan.profiler.model import profile_model
    from autoplan.schema import Plan

    if not rows:
        return cluster
    base = cluster.model_copy(update={"layer_overhead_fwd_s": 0.0, "layer_overhead_bwd_s": 0.0})
    profiles, fwd, bwd = {}, [], []
    for row in rows:
        key = (row["model"], row["seq_len"], row.get("dtype", "bfloat16"))
        if key not in profiles:
            profiles[key] = profile_model(row["model"], seq_len=row["seq_len"], dtype=getattr(torch, key[2]))
        profile = profiles[key]
        block = int(row["layer"].rsplit(".", 1)[-1]) if row["layer"].rsplit(".", 1)[-1].isdigit() else None
        layers = [layer for layer in profile.layers if layer.block == block and block is not None]
        if not layers:
            continue
        plan = Plan(micro_batch_size=row["micro_batch_size"], global_batch_size=row["micro_batch_size"])
        costs = [layer_cost(layer=layer, profile=profile, cluster=base, plan=plan, recompute="none", block_first=False)
                 for layer in layers]
        fwd.append((row["fwd_median_s"] - sum(c.fwd_compute_s for c in costs)) / len(layers))
        bwd.append((row["bwd_median_s"] - sum(c.bwd_compute_s for c in costs)) / len(layers))
    if not fwd:
        return cluster
    how = (f"median over {len(fwd)} measured blocks x micro-batch sizes of (measured - kernel-work prediction) / "
           "layers per block, clamped at 0")
    sources = {**cluster.sources, "layer_overhead_fwd_s": how, "layer_overhead_bwd_s": how}
    return cluster.model_copy(update={"layer_overhead_fwd_s": max(0.0, float(np.median(fwd))),
                                      "layer_overhead_bwd_s": max(0.0, float(np.median(bwd))), "sources": sources})


# ----------------------------------------------------------------------------------------- the whole job
def default_base(device: dict) -> Cluster | None:
    """The preset of the same GPU (its unmeasured numbers are the best fallback), None for other devices."""
    if device.get("type") != "cuda":
        return None
    for key, preset in BASE_PRESETS:
        if key in device.get("name", ""):
            return Cluster.preset(preset)
    return None


# ------------------------------------------------------------------------------ feedback from measured runs
def nonnegative_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin ||design x - target|| over x >= 0 (active set: solve, drop the most negative, solve again).
    Enough for the handful of columns of the overhead fit."""
    active = [j for j in range(design.shape[1]) if np.any(design[:, j])]
    while active:
        solution, *_ = np.linalg.lstsq(design[:, active], target, rcond=None)
        if (solution >= 0).all():
            out = np.zeros(design.shape[1])
            out[active] = solution
            return out
        active.pop(int(np.argmin(solution)))
    return np.zeros(design.shape[1])


@dataclass(frozen=True)
class OverheadFit:
    cluster: Cluster
    runs: int
    mape_before: float       # step-time MAPE of the runs without fitted overheads
    mape_after: float        # and with them (in sample)
    unseen: tuple[str, ...]  # features no run exercised (left at 0)


def fit_overheads(cluster: Cluster, runs: Sequence[tuple]) -> OverheadFit:
    """Fit Cluster.overheads (seconds per call of costmodel.overhead.FEATURES) to measured runs, each a
    (ModelProfile, Plan, measured step seconds): non-negative least squares on relative residuals
    (measured - predicted without overheads - sum c_k count_k) / measured, so fast and slow plans weigh alike."""
    from autoplan.costmodel import estimate
    from autoplan.costmodel.overhead import FEATURES, call_counts

    if not runs:
        raise InvalidInputError("no measured runs to fit overheads to (did any plan of the bench run?)")
    for _, plan, seconds in runs:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
            raise InvalidInputError(f"measured step time {seconds!r} of {plan.describe()}: must be a positive, "
                                    "finite number of seconds")
    base = cluster.model_copy(update={"overheads": {}})
    measured = np.array([t for _, _, t in runs], dtype=float)
    predicted = np.array([estimate(profile, base.with_gpus(plan.gpus), plan, check=False).step_time_s
                          for profile, plan, _ in runs])
    counts = np.array([[call_counts(profile, plan)[name] for name in FEATURES] for profile, plan, _ in runs])
    coefficients = nonnegative_least_squares(counts / measured[:, None], 1 - predicted / measured)
    unseen = tuple(name for j, name in enumerate(FEATURES) if not counts[:, j].any())
    fitted = {name: float(c) for name, c in zip(FEATURES, coefficients) if name not in unseen}
    after = predicted + counts @ coefficients
    sources = {**cluster.sources, "overheads": (
        f"non-negative least squares over {len(runs)} measured runs (autoplan calibrate); not exercised by any "
        f"run, left at 0: {', '.join(unseen) or 'none'}")}
    return OverheadFit(cluster.model_copy(update={"overheads": fitted, "sources": sources}), len(runs),
                       float(np.mean(np.abs(predicted - measured) / measured)),
                       float(np.mean(np.abs(after - measured) / measured)), unseen)
