"""A dry run beside the estimate: per-GPU memory by category, measured and predicted (GiB only here)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from autoplan.schema import Cluster, DryRunResult, Estimate

GIB = 1024**3
MIB = 1024**2
CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries", "buffers")


def dryrun_table(result: DryRunResult, *, cluster: Cluster, estimate: Estimate | None = None,
                 estimate_per_stage: dict[int, dict[str, int]] | None = None) -> str:
    """Each dry-run stage's peak memory per GPU by category, with the estimate's for the same stage (split as
    the dry run measures it: costmodel.rank_memory.rank_peak(physical=True))."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, force_terminal=False, color_system=None)
    console.print(f"dry run  {result.model}, seq_len {result.seq_len}: {result.plan.describe()}")
    console.print(f"         {result.gpus} ranks on a fake process group, {result.steps} steps of "
                  f"{result.micro_batches_per_step} micro-batches, in {result.wall_s:.1f} s; {result.precision}")
    for note in result.notes:
        console.print(f"note: {note}")
    unit, size = ("GiB", GIB) if result.peak_memory_bytes >= GIB else ("MiB", MIB)
    for stage in result.stages:
        predicted = (estimate_per_stage or {}).get(stage.stage)
        console.print(f"pipeline stage {stage.stage} (rank {stage.rank}), peak at {stage.peak_phase}:")
        table = Table()
        table.add_column(f"{unit} per GPU")
        table.add_column("dry run", justify="right")
        if predicted is not None:
            table.add_column("estimate", justify="right")
            table.add_column("error", justify="right")
        for name in CATEGORIES:
            measured = stage.memory_breakdown.get(name, 0)
            cells = [name, f"{measured / size:,.2f}"]
            if predicted is not None:
                cells += [f"{predicted.get(name, 0) / size:,.2f}", _error(predicted.get(name, 0), measured)]
            table.add_row(*cells)
        total = [f"{stage.peak_memory_bytes / size:,.2f}"]
        if predicted is not None:
            tensors = sum(v for k, v in predicted.items() if k != "reserve")
            total += [f"{tensors / size:,.2f}", _error(tensors, stage.peak_memory_bytes)]
        table.add_row("tensors", *total, style="bold")
        reserve = [f"{cluster.memory_reserve_bytes / size:,.2f}"] + (["", ""] if predicted is not None else [])
        table.add_row("reserve", *reserve)
        console.print(table)
    needed = result.peak_memory_bytes + cluster.memory_reserve_bytes
    verdict = "fits" if result.fits(cluster) else "DOES NOT FIT"
    line = (f"memory/GPU  {needed / GIB:.2f} GiB of {cluster.memory_bytes / GIB:.2f} GiB on {cluster.gpu} ({verdict}; "
            f"stage {result.peak_stage})")
    if estimate is not None:
        line += f"; estimated {estimate.memory_per_gpu_bytes / GIB:.2f} GiB"
    console.print(line)
    if result.plan.offload != "none":
        host = f"host/GPU    {result.host_memory_bytes / GIB:.2f} GiB of {cluster.host_memory_per_gpu_bytes / GIB:.2f} GiB " \
               f"(offload={result.plan.offload}: states in host memory, not in the GPU's bytes above)"
        if estimate is not None:
            host += f"; estimated {estimate.host_memory_per_gpu_bytes / GIB:.2f} GiB"
        console.print(host)
    if result.step_time_s is not None:
        console.print(time_table(result, estimate))
    return buffer.getvalue()


def time_table(result: DryRunResult, estimate: Estimate | None = None) -> Table:
    """The time dry run's step and breakdown (ms), beside the estimate's."""
    table = Table(title=f"step time on {result.cluster} (the traced ops priced; ms)")
    table.add_column("category")
    table.add_column("dry run", justify="right")
    if estimate is not None:
        table.add_column("estimate", justify="right")
        table.add_column("error", justify="right")
    rows = [(name, seconds, (estimate.time_breakdown.get(name, 0.0) if estimate else None))
            for name, seconds in result.time_breakdown.items()]
    rows.append(("step", result.step_time_s, estimate.step_time_s if estimate else None))
    for name, measured, predicted in rows:
        cells = [name, f"{measured * 1e3:,.2f}"]
        if estimate is not None:
            cells += [f"{predicted * 1e3:,.2f}", _error(predicted, measured)]
        table.add_row(*cells, style="bold" if name == "step" else None)
    return table


def _error(predicted: float, measured: float) -> str:
    if not measured:
        return "-" if not predicted else "new"
    return f"{(predicted / measured - 1) * 100:+.1f}%"
