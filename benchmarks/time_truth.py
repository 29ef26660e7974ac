"""Hold the cost model's step time to what the executor runs: ap.estimate's step time and breakdown against
the time dry run of the same plan (ap.dryrun(..., time=True): the executor's own code on a fake process
group, every op and collective of one step recorded and priced with the estimate's own formulas on a
compute and a communication stream, the pipeline stages combined with its pipeline formula:
costmodel.trace_time), over the memory-truth grid (benchmarks/memory_truth.py) plus context-parallel,
expert-parallel and zero-bubble points.

Both sides use the same cluster (dgx-h100) and the same per-op formulas, so a difference is a difference
in *what* is priced: the ops, bytes and collectives the executor runs against those the analytic model
assumes, and where the executor waits for its collectives against the overlap the model credits.
Targets (issue "Time truth on what runs"): step time within 5% per plan; each category within 10%, or
within 1% of the step when it is smaller than that; Spearman rank correlation >= 0.95 over the grid.

Run: python -m benchmarks.time_truth [--only SUBSTRING]   (writes benchmarks/results/time_truth.{md,json});
in two processes: --part 0/2 and --part 1/2 side by side, then --merge 2.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import autoplan as ap
from autoplan.report.accuracy import spearman
from autoplan.costmodel.trace_time import CATEGORIES
from autoplan.errors import AutoplanError
from benchmarks.memory_truth import CLUSTER, GRID, Point, _p, worst_lines

RESULTS = Path(__file__).parent / "results"
STEP_TOLERANCE = 0.05
CATEGORY_TOLERANCE = 0.10
CATEGORY_FLOOR = 0.01  # of the step: below it a category's error is judged against the step
SPEARMAN_TARGET = 0.95

EXTRA = [
    Point("llama3-8b", _p(cp=2, dp=4, zero_stage=1, global_batch_size=16), "CP (ring attention) + ZeRO-1"),
    Point("llama3-8b", _p(cp=4, tp=2, zero_stage=1, sequence_parallel=True, global_batch_size=2), "CP + TP"),
    Point("llama3-8b", _p(pp=4, dp=2, schedule="zero-bubble", recompute="full", global_batch_size=32),
          "PP zero-bubble, full recompute (refused since: support.ZERO_BUBBLE_FULL)"),
    Point("llama3-8b", _p(pp=2, dp=4, schedule="zero-bubble", zero_stage=1, global_batch_size=32),
          "PP zero-bubble + ZeRO-1"),
    Point("mixtral-8x7b", _p(dp=16, ep=8, global_batch_size=32), "EP over two nodes of data-parallel ranks"),
]


def _error(est: float, dry: float) -> float:
    return (est - dry) / dry if dry else (0.0 if not est else float("inf"))


def compare(estimated: dict[str, float], measured: dict[str, float], est_step_s: float, dry_step_s: float) -> dict:
    """Step and per-category errors of one plan, and whether each is within target."""
    categories = {}
    for name in CATEGORIES:
        dry, est = measured.get(name, 0.0), estimated.get(name, 0.0)
        small = dry < CATEGORY_FLOOR * dry_step_s
        within = abs(est - dry) <= (CATEGORY_FLOOR * dry_step_s if small else CATEGORY_TOLERANCE * dry)
        categories[name] = {"dry_s": dry, "estimate_s": est, "error": _error(est, dry), "within": bool(within),
                            "of_step": (est - dry) / dry_step_s}
    error = _error(est_step_s, dry_step_s)
    return {"dry_s": dry_step_s, "estimate_s": est_step_s, "error": error,
            "within_step": abs(error) <= STEP_TOLERANCE,
            "within": abs(error) <= STEP_TOLERANCE and all(c["within"] for c in categories.values()),
            "categories": categories}


def run_point(point: Point, profiles: dict) -> dict:
    plan = ap.Plan(**point.plan)
    row = {"model": point.model, "plan": plan.model_dump(), "describe": plan.describe(), "gpus": plan.gpus,
           "why": point.why}
    if point.model not in profiles:
        profiles[point.model] = ap.profile_model(point.model)
    cluster = ap.Cluster.preset(CLUSTER, gpus=plan.gpus)
    est = ap.estimate(profiles[point.model], cluster, plan)
    start = time.perf_counter()
    try:
        dry = ap.dryrun(point.model, plan, time=True, cluster=cluster)
    except AutoplanError as err:
        return {**row, "skipped": str(err)}
    row["dryrun_s"] = time.perf_counter() - start
    row["stages"] = [{"stage": s.stage, "fwd_s": s.fwd_s, "bwd_s": s.bwd_s, "after_backward_s": s.after_backward_s,
                      "trace_ops": s.trace_ops} for s in dry.stages]
    return {**row, **compare(est.time_breakdown, dry.time_breakdown, est.step_time_s, dry.step_time_s)}


def summarise(rows: list[dict]) -> dict:
    run = [r for r in rows if "skipped" not in r]
    errors = [abs(r["error"]) for r in run]
    worst: dict[str, dict] = {}
    for row in run:
        for name, c in row["categories"].items():
            small = c["dry_s"] < CATEGORY_FLOOR * row["dry_s"]
            error = c["of_step"] if small else c["error"]
            if c["dry_s"] == 0 and c["estimate_s"] == 0:
                continue
            if name not in worst or abs(error) > abs(worst[name]["error"]):
                worst[name] = {"error": error, "basis": "of the step" if small else "of the category",
                               "where": f"{row['model']} {row['describe']}"}
    return {"run": len(run), "skipped": len(rows) - len(run), "within_step": sum(r["within_step"] for r in run),
            "within": sum(r["within"] for r in run),
            "mean_abs_error": sum(errors) / len(errors) if errors else float("nan"),
            "max_abs_error": max(errors, default=float("nan")),
            "spearman": spearman([r["estimate_s"] for r in run], [r["dry_s"] for r in run]), "worst": worst}


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%" if x not in (float("inf"), float("-inf")) else "inf"


def _cell(c: dict, step_s: float) -> str:
    if not c["dry_s"] and not c["estimate_s"]:
        return "-"
    text = _pct(c["error"]) if c["dry_s"] >= CATEGORY_FLOOR * step_s else f"{_pct(c['of_step'])} of step"
    return text + ("" if c["within"] else " **x**")


def markdown(rows: list[dict], summary: dict) -> str:
    shown = [c for c in CATEGORIES if c != "overhead"]
    lines = ["# Time truth: the cost model against the time dry run", "",
             "Command: `python -m benchmarks.time_truth`. Each plan is estimated with `ap.estimate` and dry-run with "
             "`ap.dryrun(..., time=True)` on the dgx-h100 preset: the executor's code on a fake process group, the "
             "ops and collectives of one step priced with the estimate's own formulas on a compute and a "
             "communication stream, the pipeline stages combined with its pipeline formula "
             "(`autoplan/costmodel/trace_time.py`). Errors are estimate / dry run - 1; a category smaller than 1% "
             "of the step is shown as its difference over the step. Targets: step within 5%; each category within "
             "10% or 1% of the step; Spearman >= 0.95.", "",
             f"**{summary['within_step']} of {summary['run']} plans have the step within 5%**, {summary['within']} "
             f"also every category; mean |error| {summary['mean_abs_error'] * 100:.1f}%, max "
             f"{summary['max_abs_error'] * 100:.1f}%; Spearman {summary['spearman']:.3f} "
             f"({'met' if summary['spearman'] >= SPEARMAN_TARGET else 'missed'}); {summary['skipped']} skipped "
             f"(the executor refuses them).", "",
             "| model | plan | GPUs | dry s | est s | step | " + " | ".join(shown) + " | dry run s |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(shown) + "---:|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['describe']} | {row['gpus']} | - | - | skipped: {row['skipped']} |"
                         + " |" * len(shown) + " |")
            continue
        cells = " | ".join(_cell(row["categories"][name], row["dry_s"]) for name in shown)
        flag = "" if row["within_step"] else " **x**"
        lines.append(f"| {row['model']} | {row['describe']} | {row['gpus']} | {row['dry_s']:.3f} | "
                     f"{row['estimate_s']:.3f} | {_pct(row['error'])}{flag} | {cells} | {row['dryrun_s']:.0f} |")
    lines += worst_lines(summary, "Worst error per category (estimate - dry run, over the dry-run value, or over "
                                  "the step for a category under 1% of it):")
    return "\n".join(lines) + "\n"


def write(rows: list[dict]) -> dict:
    summary = summarise(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "time_truth.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    (RESULTS / "time_truth.md").write_text(markdown(rows, summary))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the points whose model or description contains this")
    parser.add_argument("--part", help="I/N: run every N-th point from the I-th (0-based) and write its rows to "
                                       "results/time_truth.partI.json (to run parts in parallel processes)")
    parser.add_argument("--skip", action="append", default=[], help="leave out the points whose description "
                                                                     "contains this (repeatable)")
    parser.add_argument("--resume", action="store_true", help="with --part: keep the rows its file has, run the rest")
    parser.add_argument("--merge", type=int, metavar="N", help="write time_truth.{md,json} from the N parts' rows")
    args = parser.parse_args()
    points = [p for p in GRID + EXTRA if not args.only or args.only in p.model or args.only in p.why]
    if args.merge:
        parts = [json.loads((RESULTS / f"time_truth.part{i}.json").read_text()) for i in range(args.merge)]
        order = {(p.model, ap.Plan(**p.plan).describe()): i for i, p in enumerate(points)}
        unique = {(row["model"], row["describe"]): row for part in reversed(parts) for row in part}
        rows = sorted(unique.values(), key=lambda r: order[(r["model"], r["describe"])])
        summary = write(rows)
        for i in range(args.merge):
            (RESULTS / f"time_truth.part{i}.json").unlink()
        print(f"{summary['within_step']}/{summary['run']} within 5%; Spearman {summary['spearman']:.3f}")
        return
    index, count = map(int, args.part.split("/")) if args.part else (0, 1)
    profiles: dict = {}
    rows = []
    done = RESULTS / f"time_truth.part{index}.json"
    if args.part and args.resume and done.exists():
        rows = json.loads(done.read_text())
    finished = {(row["model"], row["describe"]) for row in rows}
    for point in points[index::count]:
        if (point.model, ap.Plan(**point.plan).describe()) in finished or any(skip in point.why for skip in args.skip):
            continue
        row = run_point(point, profiles)
        rows.append(row)
        print(f"{row['model']:13s} {row['describe']}: " + (f"skipped ({row['skipped']})" if "skipped" in row else
              f"dry {row['dry_s']:.3f} s, estimate {row['estimate_s']:.3f} s ({_pct(row['error'])})"), flush=True)
        if args.part:
            (RESULTS / f"time_truth.part{index}.json").write_text(json.dumps(rows, indent=1) + "\n")
    if not args.part:
        summary = write(rows)
        print(f"{summary['within_step']}/{summary['run']} within 5%; Spearman {summary['spearman']:.3f}")


if __name__ == "__main__":
    main()
