"""The table and the plot of a GPU-count sweep (planner.sweep): hours, days and GiB only here."""

from __future__ import annotations

import io
from pathlib import Path

from autoplan.planner.sweep import SweepResult
from autoplan.report.tables import GIB, _console, count
from autoplan.safe_io import write_bytes


def duration(seconds: float) -> str:
    """3.2 h, 12.5 d: a training time as people say it."""
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def sweep_table(result: SweepResult) -> str:
    """One line per GPU count: the best plan, tokens/s per GPU, MFU, memory, time to train, GPU-hours, cost."""
    from rich.table import Table

    console, buffer = _console(width=160)
    console.print(f"model   {result.model}; cluster {result.cluster}; global batch {result.global_batch_size} "
                  f"sequences; {count(result.tokens)} tokens to train")
    table = Table(title="best plan per GPU count", title_justify="left")
    columns = ["GPUs", "best plan", "step ms", "tokens/s/GPU", "MFU", "mem GiB", "time to train", "GPU-hours"]
    if result.gpu_hour_price is not None:
        columns.append("cost")
    for name in columns:
        table.add_column(name, justify="left" if name == "best plan" else "right")
    for row in result.rows:
        if row.plan is None:
            table.add_row(str(row.gpus), f"nothing fits: {row.reason}", *[""] * (len(columns) - 2))
            continue
        est = row.estimate
        cells = [str(row.gpus), row.plan.describe(), f"{est.step_time_s * 1e3:,.0f}",
                 f"{row.tokens_per_s_per_gpu():,.0f}", f"{est.mfu * 100:.1f}%",
                 f"{est.memory_per_gpu_bytes / GIB:.1f}", duration(row.time_to_train_s(result.tokens)),
                 f"{row.gpu_hours(result.tokens):,.0f}"]
        if result.gpu_hour_price is not None:
            cells.append(f"{result.cost(row):,.0f}")
        table.add_row(*cells)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
    return buffer.getvalue()


def sweep_plot(result: SweepResult, path: str | Path, *, force: bool = False) -> Path:
    """PNG at `path`: tokens/s per GPU and time to train against the GPU count (log2 axis); counts where
    nothing fits are marked on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = result.fitting
    fig, left = plt.subplots(figsize=(8, 4.5))
    left.set_xscale("log", base=2)
    left.set_xlabel("GPUs")
    left.set_ylabel("tokens/s per GPU", color="#4c72b0")
    if fits:
        left.plot([r.gpus for r in fits], [r.tokens_per_s_per_gpu() for r in fits], "o-", color="#4c72b0")
        left.set_ylim(bottom=0)
        right = left.twinx()
        right.set_yscale("log")
        right.set_ylabel("time to train (days)", color="#dd8452")
        right.plot([r.gpus for r in fits], [r.time_to_train_s(result.tokens) / 86400 for r in fits], "s--",
                   color="#dd8452")
    for row in result.rows:
        if row.plan is None:
            left.axvline(row.gpus, color="grey", linestyle=":", linewidth=1)
    left.set_title(f"{result.model} on {result.cluster}: {count(result.tokens)} tokens, "
                   f"global batch {result.global_batch_size} (dotted: nothing fits)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_bytes(path, buffer.getvalue(), force=force)
