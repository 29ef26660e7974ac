"""Readable tables of an Estimate: time and memory breakdowns (ms and GiB only here, SI elsewhere)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from autoplan.schema import Cluster, Estimate, ModelProfile, Plan

GIB = 1024**3


def _console(width: int = 100) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width, force_terminal=False, color_system=None), buffer


def estimate_table(estimate: Estimate, *, plan: Plan, cluster: Cluster, profile: ModelProfile) -> str:
    """The estimate of one plan as text: headline numbers, time breakdown, memory breakdown."""
    console, buffer = _console()
    console.print(f"model   {profile.name}  ({profile.total_params / 1e9:.2f}B params, seq_len {profile.seq_len})")
    console.print(f"cluster {cluster.name}: {cluster.num_gpus} x {cluster.gpu}, {cluster.gpus_per_node} per node")
    console.print(f"plan    {plan.describe()}")
    headline = Table(show_header=False, box=None, pad_edge=False)
    headline.add_row("step time", f"{estimate.step_time_s * 1e3:,.1f} ms")
    headline.add_row("throughput", f"{estimate.tokens_per_s:,.0f} tokens/s")
    headline.add_row("MFU", f"{estimate.mfu * 100:.1f}%  ({estimate.model_flops_per_gpu_per_s / 1e12:.0f} TFLOP/s "
                             f"per GPU; {estimate.hardware_flops_per_gpu_per_s / 1e12:.0f} with recompute)")
    verdict = "fits" if estimate.fits else "DOES NOT FIT"
    headline.add_row("memory/GPU", f"{estimate.memory_per_gpu_bytes / GIB:.2f} GiB of "
                                   f"{estimate.memory_limit_bytes / GIB:.2f} GiB ({verdict}; stage {estimate.peak_stage})")
    console.print(headline)
    console.print(_breakdown("time", {k: v * 1e3 for k, v in estimate.time_breakdown.items()}, "ms",
                             estimate.step_time_s * 1e3))
    console.print(_breakdown("memory (peak stage)", {k: v / GIB for k, v in estimate.memory_breakdown.items()},
                             "GiB", estimate.memory_per_gpu_bytes / GIB))
    for note in estimate.notes:
        console.print(f"note: {note}")
    return buffer.getvalue()


def _breakdown(title: str, parts: dict[str, float], unit: str, total: float) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column(unit, justify="right")
    table.add_column("share", justify="right")
    for name, value in parts.items():
        table.add_row(name, f"{value:,.2f}", f"{value / total * 100:5.1f}%" if total else "-")
    table.add_row("total", f"{total:,.2f}", "100.0%", style="bold")
    return table
