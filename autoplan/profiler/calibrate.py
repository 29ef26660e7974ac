"""Measurements (profiler.hardware, profiler.blocks) -> Cluster: the GEMM efficiency curve, the links'
alpha-beta (both fitted by profiler.fitting), the rest; the per-call overheads fitted to measured runs
(`autoplan calibrate`) are profiler.overheads.

Fitting is plain functions over the measurement dicts (no torch), so they are tested on synthetic data;
the whole job that `autoplan profile` runs (measure, fit, write the Cluster file) is profiler.session.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoplan.errors import InvalidInputError
from autoplan.profiler.fitting import MIN_EFFICIENCY, LinkFit, fit_gemm_curve, fit_link_detailed
from autoplan.profiler.overheads import fit_layer_overhead
from autoplan.schema import Cluster, Link, Stack

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


# ----------------------------------------------------------------------------------------- links
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


def _largest_copy(rows: Sequence[dict]) -> dict | None:
    """The copy of the largest buffer among the bandwidth measurements (the fastest of equal sizes): the memory
    bandwidth, and the buffer size the other kernels' rates are read at; None when no copy was measured."""
    copies = [p for p in rows if p["op"] == "copy"]
    return max(copies, key=lambda p: (p["bytes"], p["achieved_bytes_per_s"])) if copies else None


def _memory(measurements: dict, *, base: Cluster | None, where: str) -> tuple[float, float, dict]:
    """(bandwidth from the largest copy, memory-bound efficiency = median of gelu/layer_norm rates over the
    copy rate of the same buffer, sources)."""
    rows = measurements.get("bandwidth") or []
    copy = _largest_copy(rows)
    if copy is None:
        if base is None:
            raise InvalidInputError("no memory-bandwidth measurements and no base cluster")
        note = f"not measured: from {base.name}"
        return base.memory_bandwidth_bytes_per_s, base.memory_bound_efficiency, \
            {"memory_bandwidth_bytes_per_s": note, "memory_bound_efficiency": note}
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
    copy = _largest_copy(rows)
    size = copy["bytes"] if copy is not None else None
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


# ----------------------------------------------------------------------------------------- the whole job
def default_base(device: dict) -> Cluster | None:
    """The preset of the same GPU (its unmeasured numbers are the best fallback), None for other devices."""
    if device.get("type") != "cuda":
        return None
    for key, preset in BASE_PRESETS:
        if key in device.get("name", ""):
            return Cluster.preset(preset)
    return None
