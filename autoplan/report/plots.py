"""The plots of a benchmark report (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from autoplan.costmodel.estimate import Coster  # noqa: E402
from autoplan.report.timeline import schedule_timeline  # noqa: E402
from autoplan.safe_io import write_bytes  # noqa: E402
from autoplan.schema import Cluster, ModelProfile, Plan  # noqa: E402

MIB = 2**20
COLORS = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868"}


def _name(row: dict, index: int) -> str:
    return f"{index}: {row['labels'][0]}"


def predicted_vs_measured(results: dict, path: Path) -> None:
    ok = [(i, r) for i, r in enumerate(results["plans"]) if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 6))
    if ok:
        x = [r["predicted_step_time_s"] * 1e3 for _, r in ok]
        y = [r["measured_step_time_s"] * 1e3 for _, r in ok]
        ax.scatter(x, y, color="#4c72b0", zorder=3)
        for (i, _), px, py in zip(ok, x, y):
            ax.annotate(str(i), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
        low, top = min(x + y) / 1.3, max(x + y) * 1.3
        ax.plot([low, top], [low, top], color="grey", linestyle="--", label="y = x")
        if top / low > 20:  # times spanning decades: log axes keep the fast plans apart
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            low = 0
        ax.set_xlim(low, top)
        ax.set_ylim(low, top)
        ax.legend()
    ax.set_xlabel("predicted step time (ms)")
    ax.set_ylabel("measured step time (ms)")
    ax.set_title("Step time: predicted against measured (numbers: plan index)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def time_breakdown(results: dict, path: Path) -> None:
    rows = results["plans"]
    parts = sorted({k for r in rows for k, v in r["predicted_time_breakdown"].items() if v > 0})
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    bottoms = [0.0] * len(rows)
    for part in parts:
        heights = [r["predicted_time_breakdown"].get(part, 0.0) * 1e3 for r in rows]
        ax.bar(range(len(rows)), heights, bottom=bottoms, label=part)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    measured = [(i, r["measured_step_time_s"] * 1e3) for i, r in enumerate(rows) if r["status"] == "ok"]
    if measured:
        ax.scatter([i for i, _ in measured], [m for _, m in measured], color="black", marker="_", s=400,
                   zorder=3, label="measured")
    ax.set_xticks(range(len(rows)), [_name(r, i) for i, r in enumerate(rows)], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms per step")
    ax.set_title("Predicted time breakdown per plan (bar) and measured step time (line)")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def memory(results: dict, path: Path) -> None:
    rows = results["plans"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["predicted_memory_bytes"] / MIB for r in rows], width=0.4, label="predicted")
    ax.bar([x + 0.2 for x in xs], [(r["measured_memory_bytes"] or 0) / MIB for r in rows], width=0.4,
           label="measured (tensors)")
    limit = rows[0]["memory_limit_bytes"] / MIB if rows else 0
    if rows and limit < 4 * max(r["predicted_memory_bytes"] / MIB for r in rows):
        ax.axhline(limit, color="red", linestyle="--", label="limit")
    else:
        ax.set_title(f"(limit {limit:,.0f} MiB, off the scale)", fontsize=8, loc="right")
    ax.set_xticks(list(xs), [_name(r, i) for i, r in enumerate(rows)], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MiB per rank")
    ax.set_title("Peak memory per rank", loc="left")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def pipeline_timeline(plan: Plan, profile: ModelProfile, cluster: Cluster, path: Path, title: str) -> None:
    ranks = Coster.of(profile, cluster).rank_costs(plan)
    ops = schedule_timeline(schedule=plan.schedule, stage_fwd_s=[r.layers.fwd_s for r in ranks],
                            stage_bwd_s=[r.layers.bwd_s for r in ranks], num_micro_batches=plan.num_micro_batches,
                            virtual_stages=plan.virtual_stages)
    fig, ax = plt.subplots(figsize=(10, 0.6 * plan.pp + 1.8))
    for op in ops:
        ax.barh(op.rank, (op.end_s - op.start_s) * 1e3, left=op.start_s * 1e3, color=COLORS[op.kind],
                edgecolor="white", height=0.8)
        label = f"{op.micro_batch}" + (f".{op.chunk}" if plan.virtual_stages > 1 else "")
        ax.text((op.start_s + op.end_s) / 2 * 1e3, op.rank, label, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(plan.pp), [f"stage {r}" for r in range(plan.pp)])
    ax.invert_yaxis()
    ax.set_xlabel("ms (predicted per-stage times)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for k, c in COLORS.items() if any(op.kind == k for op in ops)]
    ax.legend(handles, [{"F": "forward", "B": "backward", "W": "weight gradient"}[k] for k in COLORS
                        if any(op.kind == k for op in ops)], fontsize=7, loc="upper right")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_plots(results: dict, out: Path, *, profile: ModelProfile, cluster: Cluster) -> dict[str, str]:
    """Write the report's PNGs into `out`; {title: file name}."""
    figures = {"Predicted against measured step time": "step_time.png",
               "Time breakdown per plan": "time_breakdown.png", "Memory per rank against the limit": "memory.png"}
    predicted_vs_measured(results, out / "step_time.png")
    time_breakdown(results, out / "time_breakdown.png")
    memory(results, out / "memory.png")
    ok = [r for r in results["plans"] if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["measured_tokens_per_s"]) if ok else results["plans"][0] if results["plans"] else None
    piped = [r for r in results["plans"] if r["plan"]["pp"] > 1]
    if best is not None and (best["plan"]["pp"] > 1 or piped):
        chosen = best if best["plan"]["pp"] > 1 else min(piped, key=lambda r: r.get("measured_step_time_s") or
                                                         r["predicted_step_time_s"] * 1e3)
        plan = Plan.model_validate(chosen["plan"])
        which = "best plan" if chosen is best else "best pipelined plan (the best plan has no pipeline)"
        pipeline_timeline(plan, profile, cluster, out / "pipeline.png",
                          f"Pipeline schedule of the {which}: {plan.describe()}")
        figures["Pipeline schedule timeline"] = "pipeline.png"
    return figures


def _save(fig, path) -> None:
    """The figure as PNG at `path`, atomically and never through a link (safe_io)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_bytes(path, buffer.getvalue(), force=True)
