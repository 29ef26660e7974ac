"""Readable tables of an Estimate: time and memory breakdowns (ms and GiB only here, SI elsewhere)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from autoplan.schema import Cluster, Estimate, ModelProfile, Plan

GIB = 1024**3


def count(n: float) -> str:
    """1.3B, 22.1M, 8.2K: a parameter count as people say it."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _console(width: int = 100) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width, force_terminal=False, color_system=None), buffer


def estimate_table(estimate: Estimate, *, plan: Plan, cluster: Cluster, profile: ModelProfile) -> str:
    """The estimate of one plan as text: headline numbers, time breakdown, memory breakdown."""
    console, buffer = _console()
    console.print(f"model   {profile.name}  ({count(profile.total_params)} params, seq_len {profile.seq_len})")
    console.print(f"cluster {cluster.name}: {cluster.num_gpus} x {cluster.gpu}, {cluster.gpus_per_node} per node")
    console.print(f"plan    {plan.describe()}")
    headline = Table(show_header=False, box=None, pad_edge=False)
    headline.add_row("step time", f"{estimate.step_time_s * 1e3:,.1f} ms{_band(estimate)}")
    headline.add_row("throughput", f"{estimate.tokens_per_s:,.0f} tokens/s")
    headline.add_row("MFU", f"{estimate.mfu * 100:.1f}%  ({estimate.model_flops_per_gpu_per_s / 1e12:.0f} TFLOP/s "
                             f"per GPU; {estimate.hardware_flops_per_gpu_per_s / 1e12:.0f} with recompute)")
    verdict = "fits" if estimate.fits else "DOES NOT FIT"
    if estimate.memory_at_risk:
        verdict = "fits, but within the memory model's error of the limit"
    headline.add_row("memory/GPU", f"{estimate.memory_per_gpu_bytes / GIB:.2f} GiB of "
                                   f"{estimate.memory_limit_bytes / GIB:.2f} GiB ({verdict}; stage {estimate.peak_stage})")
    if plan.offload != "none":
        headline.add_row("host/GPU", f"{estimate.host_memory_per_gpu_bytes / GIB:.2f} GiB of "
                                     f"{estimate.host_memory_limit_bytes / GIB:.2f} GiB (offload={plan.offload})")
    console.print(headline)
    console.print(_breakdown("time", {k: v * 1e3 for k, v in estimate.time_breakdown.items()}, "ms",
                             estimate.step_time_s * 1e3))
    console.print(_breakdown("memory (peak stage)", {k: v / GIB for k, v in estimate.memory_breakdown.items()},
                             "GiB", estimate.memory_per_gpu_bytes / GIB))
    for note in estimate.notes:
        console.print(f"note: {note}")
    return buffer.getvalue()


def _band(estimate: Estimate) -> str:
    """'  (published runs: 3,600-4,700 ms)': where runs predicted at this time took (costmodel.bands)."""
    band = estimate.step_time_band_s
    if not band or band[0] == band[1]:
        return ""
    return f"  (published runs so predicted took {band[0] * 1e3:,.0f}-{band[1] * 1e3:,.0f} ms)"


def _breakdown(title: str, parts: dict[str, float], unit: str, total: float) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column(unit, justify="right")
    table.add_column("share", justify="right")
    for name, value in parts.items():
        table.add_row(name, f"{value:,.2f}", f"{value / total * 100:5.1f}%" if total else "-")
    table.add_row("total", f"{total:,.2f}", "100.0%", style="bold")
    return table


def _short(plan: Plan) -> str:
    extra = f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else ""
    uneven = " uneven" if plan.layers_per_stage else ""
    rec = "/".join(plan.recompute_per_stage) if plan.recompute_per_stage else plan.recompute
    return f"{plan.schedule}{extra}{uneven}", rec


def plans_table(rows: list[tuple[str, Plan, Estimate]], *, title: str) -> Table:
    """One line per plan: parallel sizes, ZeRO, recompute, micro-batch, schedule, time, MFU, memory (an etp
    column only when a plan splits its experts' width)."""
    table = Table(title=title, title_justify="left")
    etp = any(plan.etp > 1 for _, plan, _ in rows)
    for name, justify in (("#", "left"), ("dp", "right"), ("tp", "right"), ("pp", "right"), ("cp", "right"),
                          ("ep", "right"), *((("etp", "right"),) if etp else ()), ("zero", "right"),
                          ("recompute", "left"), ("mbs", "right"),
                          ("schedule", "left"), ("step ms", "right"), ("band ms", "right"), ("tokens/s", "right"),
                          ("MFU", "right"),
                          ("mem GiB / limit", "right")):
        table.add_column(name, justify=justify)
    offloads = any(plan.offload != "none" for _, plan, _ in rows)
    if offloads:  # only when a plan offloads: tables of plans that do not stay as they were
        table.add_column("offload", justify="left")
        table.add_column("host GiB", justify="right")
    for label, plan, est in rows:
        schedule, rec = _short(plan)
        extra = (plan.offload, f"{est.host_memory_per_gpu_bytes / GIB:.0f} / {est.host_memory_limit_bytes / GIB:.0f}"
                 if plan.offload != "none" else "-") if offloads else ()
        table.add_row(label, str(plan.dp), str(plan.tp), str(plan.pp), str(plan.cp), str(plan.ep),
                      *((str(plan.etp),) if etp else ()), str(plan.zero_stage), rec, str(plan.micro_batch_size), schedule,
                      f"{est.step_time_s * 1e3:,.1f}", _band_cell(est), f"{est.tokens_per_s:,.0f}", f"{est.mfu * 100:.1f}%",
                      f"{est.memory_per_gpu_bytes / GIB:.1f} / {est.memory_limit_bytes / GIB:.1f}"
                      + (" !" if est.memory_at_risk else ""), *extra)
    return table


def _band_cell(est: Estimate) -> str:
    band = est.step_time_band_s
    return f"{band[0] * 1e3:,.0f}-{band[1] * 1e3:,.0f}" if band and band[0] != band[1] else "-"


def comparison_table(columns: list[tuple[str, Estimate]], *, title: str) -> Table:
    """Time (ms) and memory (GiB) breakdowns of a few plans side by side."""
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    for name, _ in columns:
        table.add_column(name, justify="right")
    for key in columns[0][1].time_breakdown:
        table.add_row(f"{key} ms", *(f"{est.time_breakdown[key] * 1e3:,.1f}" for _, est in columns))
    table.add_row("step ms", *(f"{est.step_time_s * 1e3:,.1f}" for _, est in columns), style="bold")
    for key in columns[0][1].memory_breakdown:
        table.add_row(f"{key} GiB", *(f"{est.memory_breakdown[key] / GIB:.2f}" for _, est in columns))
    table.add_row("memory GiB", *(f"{est.memory_per_gpu_bytes / GIB:.2f}" for _, est in columns), style="bold")
    return table


def search_report(result, *, profile: ModelProfile, cluster: Cluster) -> str:
    """The top plans, the expert defaults, and why the best plan wins."""
    console, buffer = _console(width=140)
    console.print(f"model   {profile.name}  ({count(profile.total_params)} params, seq_len {profile.seq_len}); "
                  f"global batch {result.global_batch_size} sequences")
    console.print(f"cluster {cluster.name}: {cluster.num_gpus} x {cluster.gpu}, {cluster.gpus_per_node} per node")
    pruned = ", ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in result.candidates_pruned.items() if n)
    console.print(f"search  {result.solve_time_s:.2f} s: {result.candidates_considered:,} configurations evaluated, "
                  f"{result.ilp_solves} partition ILPs; pruned {pruned or 'none'}")
    console.print(f"        proven lower bound {result.lower_bound_s * 1e3:,.1f} ms (best is within "
                  f"{result.optimality_gap * 100:.2f}%)")
    refusal = getattr(result, "refusal", lambda plan: None)
    mark = lambda label, plan: f"{label} x" if refusal(plan) else label  # noqa: E731
    rows = [(mark(str(i + 1), plan), plan, est) for i, (plan, est) in enumerate(result.ranked)]
    console.print(plans_table(rows, title="top plans"))
    console.print("band ms: the step times that published runs predicted at this time took (80% of them, "
                  "benchmarks/results/published_runs.md); !: memory within the memory model's error of the limit")
    defaults = [(name, *found) for name, found in result.baselines.items() if found]
    if defaults:
        console.print(plans_table([(mark(name, plan), plan, est) for name, plan, est in defaults],
                                  title="expert defaults (best fitting variant of each)"))
    refused = {plan.describe(): refusal(plan) for _, plan, _ in rows + defaults if refusal(plan)}
    for described, reason in refused.items():
        console.print(f"x not runnable by autoplan's executor: {described}: {reason}")
    missing = [name for name, found in result.baselines.items() if not found]
    if missing:
        console.print(f"no fitting plan for: {', '.join(missing)}")
    columns = [("best", result.ranked[0][1])]
    if len(result.ranked) > 1:
        columns.append(("runner-up", result.ranked[1][1]))
    if defaults:
        name, _, est = min(defaults, key=lambda row: row[2].step_time_s)
        columns.append((name, est))
    console.print(comparison_table(columns, title="why the best plan wins"))
    best = result.ranked[0][0]
    if best.layers_per_stage:
        console.print(f"best plan's blocks per pipeline chunk: {best.layers_per_stage}")
    if best.recompute_per_stage:
        console.print(f"best plan's recompute per stage: {best.recompute_per_stage}")
    return buffer.getvalue()
