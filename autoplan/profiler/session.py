"""One profile of this machine, what `autoplan profile` runs: the settings (what to measure on a GPU or a
CPU, quick or not), the device, every measurement (profiler.hardware, profiler.blocks) with a progress
bar, the fit (profiler.calibrate) and the Cluster file. Alone or under torchrun:
`python -m autoplan.profiler.session [MODEL] --out cluster.json [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autoplan.profiler.blocks import measure_layers
from autoplan.profiler.calibrate import calibrated_cluster, default_base
from autoplan.profiler.hardware import (COLLECTIVE_OPS, comm_groups, gemm_shapes, measure_attention, measure_collectives,
                                        measure_gemm_curve, measure_memory_bandwidth, measure_optimizer)
from autoplan.profiler.timing import Progress, distributed, no_progress
from autoplan.schema import Cluster, Link


# parameters of the timed optimizer step: fp32 states well beyond a last-level cache (CPU: 4M, 64 MiB of
# states; GPU: 64M, 1 GiB of bf16 parameters and 3 GiB of fp32 states)
OPTIMIZER_PARAMS = {"cpu": 2**22, "cuda": 2**26}


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
    total = (len(settings.gemm_shapes) + 4 * len(settings.memory_sizes_bytes) + len(settings.attention_shapes) + 1
             + sum(len(COLLECTIVE_OPS) for _ in groups) * len(settings.collective_sizes_bytes)
             + (len(settings.layer_micro_batch_sizes) if model else 0))
    common = dict(dtype=settings.dtype, repeats=settings.repeats, device=device)
    with _progress_bar(total, enabled=show_progress and rank == 0 and sys.stderr.isatty()) as progress:
        gemm = measure_gemm_curve(sizes=settings.gemm_shapes, progress=progress, **common)
        bandwidth = measure_memory_bandwidth(sizes_bytes=settings.memory_sizes_bytes, progress=progress, **common)
        attention = measure_attention(shapes=settings.attention_shapes, progress=progress, **common)
        optimizer = measure_optimizer(numel=OPTIMIZER_PARAMS[device.type], progress=progress, **common)
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
            "attention": attention, "optimizer": optimizer, "collectives": collectives, "layers": layers,
            "host_blocks": host, "notes": notes}


class _progress_bar:
    """A rich progress bar on stderr (rank 0, TTY only); yields a `progress(description)` callable."""

    def __init__(self, total: int, *, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self) -> Progress:
        if not self.enabled:
            self.bar = None
            return no_progress
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


def run_profile(*, out: str | None = None, quick: bool = False, model: str | None = None, name: str | None = None,
                peak_flops_per_s: float | None = None, base: Cluster | None = None,
                show_progress: bool = True) -> Cluster:
    """Measure this machine, fit a Cluster, and (rank 0) write it to `out`. Alone: no collectives (noted
    in `sources`). Under torchrun: initialises the process group from the environment if none exists
    (nccl on CUDA, gloo on CPU), measures the interconnect too, and destroys the group it created.
    `base`: the cluster unmeasured numbers come from (default: the preset of the same GPU, if any)."""
    created = init_distributed_from_env()
    try:
        device = profile_device()
        settings = ProfileSettings.for_device(device, quick=quick)
        measurements = measure_all(settings, device=device, model=model, show_progress=show_progress)
        world = measurements["world_size"]
        if world > 1:
            gpus_per_node = min(world, measurements["local_world_size"])
        else:
            gpus_per_node = torch.cuda.device_count() if device.type == "cuda" else 1
        cluster = calibrated_cluster(name=name or f"measured-{socket.gethostname()}", measurements=measurements,
                                     gpus_per_node=gpus_per_node, num_gpus=world, peak_flops_per_s=peak_flops_per_s,
                                     base=base if base is not None else default_base(measurements["device"]))
        if out and (not distributed() or dist.get_rank() == 0):
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            cluster.save(out)
        if distributed():
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
    return cluster


def summary(cluster: Cluster) -> str:
    """The fitted numbers in a few lines (TFLOP/s, GB/s, us)."""
    curve = ", ".join(f"{p.flops:.2g}:{p.efficiency:.2f}" for p in cluster.gemm_efficiency)

    def link(l: Link) -> str:
        return f"{l.bandwidth_bytes_per_s / 1e9:.2f} GB/s, {l.latency_s * 1e6:.1f} us"

    return "\n".join([
        f"{cluster.name}: {cluster.num_gpus} x {cluster.gpu} ({cluster.gpus_per_node} per node)",
        f"peak {cluster.peak_flops_per_s / 1e12:.4g} TFLOP/s; GEMM efficiency (FLOPs:eff) {curve}",
        f"memory {cluster.memory_bytes / 2**30:.1f} GiB, bandwidth {cluster.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
        f"memory-bound eff {cluster.memory_bound_efficiency:.2f}, attention eff {cluster.attention_efficiency:.2f}",
        f"intra_node {link(cluster.intra_node)}; inter_node {link(cluster.inter_node)}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m autoplan.profiler.session [MODEL] --out cluster.json [--quick]`, alone or under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m autoplan.profiler.session",
                                     description="Measure this machine (and its interconnect under torchrun) "
                                                 "and write a Cluster JSON file.")
    parser.add_argument("model", nargs="?", default=None, help="also time the blocks of this model (e.g. gpt-tiny)")
    parser.add_argument("--out", default=None, help="where rank 0 writes the Cluster JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: seconds, not minutes")
    parser.add_argument("--name", default=None, help="label of the measured cluster")
    parser.add_argument("--peak-flops", type=float, default=None, help="declared peak FLOP/s of one device")
    args = parser.parse_args(argv)

    from autoplan.errors import AutoplanError

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
