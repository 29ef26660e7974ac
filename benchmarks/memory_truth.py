"""Hold the cost model's memory to the truth: ap.estimate's per-GPU memory and its breakdown against a dry
run of the same plan (the executor's own code on a fake process group with fake tensors, every tensor byte
counted: executor.dryrun), over a grid of models and plans from 8 to 1024 GPUs.

Compared, for each pipeline stage the dry run ran (the first and the last): the peak tensor memory
(the cluster's reserve excluded on both sides) and each category (params, grads, optimizer,
activations, temporaries, buffers), the estimate's split as the dry run measures it
(costmodel.rank_memory.rank_peak(physical=True): the activations a backward has freed by the peak
moment are gone, its temporaries whole; Estimate.memory_breakdown accounts as the papers do, same total). Target: total within 5%; a category within 10% of its dry-run value,
or within 1% of the peak when it is smaller than that (a near-empty category has no meaningful ratio).
Points the executor refuses (autoplan.support) are skipped with its reason.

Run: python -m benchmarks.memory_truth [--only SUBSTRING [--save-as NAME]]   (writes
benchmarks/results/memory_truth.{md,json}; a partial run only with --save-as, to memory_truth_NAME.{md,json})
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import autoplan as ap
from autoplan.costmodel.estimate import Coster
from autoplan.costmodel.rank_memory import rank_peak
from autoplan.errors import AutoplanError

RESULTS = Path(__file__).parent / "results"
CLUSTER = "dgx-h100"
CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries", "buffers")
TOTAL_TOLERANCE = 0.05
CATEGORY_TOLERANCE = 0.10
CATEGORY_FLOOR = 0.01  # of the peak: below it a category's error is judged against the peak
GIB = 2**30


@dataclass(frozen=True)
class Point:
    model: str
    plan: dict
    why: str = ""            # what the point covers
    stages: object = "ends"  # which pipeline stages to dry-run
    tags: tuple = field(default_factory=tuple)


def _p(**kw) -> dict:
    return dict(kw)


GRID = [
    # llama3-8b, seq 8192: data parallelism and ZeRO, tensor and sequence parallelism, recompute, micro-batches
    Point("llama3-8b", _p(dp=8, zero_stage=0, global_batch_size=16), "DDP"),
    Point("llama3-8b", _p(dp=8, zero_stage=1, global_batch_size=16), "ZeRO-1 (DDP + AdamW states split over the replicas)"),
    Point("llama3-8b", _p(dp=8, zero_stage=2, global_batch_size=16), "ZeRO-2 (FSDP, no reshard)"),
    Point("llama3-8b", _p(dp=8, zero_stage=3, global_batch_size=16), "ZeRO-3 (FSDP)"),
    Point("llama3-8b", _p(dp=64, zero_stage=1, global_batch_size=128), "ZeRO-1 at dp=64"),
    Point("llama3-8b", _p(dp=8, zero_stage=0, global_batch_size=8), "one micro-batch per step"),
    Point("llama3-8b", _p(dp=8, zero_stage=3, global_batch_size=8), "one micro-batch per step, ZeRO-3"),
    Point("llama3-8b", _p(tp=8, global_batch_size=2), "TP without SP"),
    Point("llama3-8b", _p(tp=8, sequence_parallel=True, global_batch_size=2), "TP with SP"),
    Point("llama3-8b", _p(tp=4, dp=2, zero_stage=1, sequence_parallel=True, global_batch_size=8), "TP + ZeRO-1"),
    Point("llama3-8b", _p(dp=8, recompute="full", global_batch_size=16), "full recompute"),
    Point("llama3-8b", _p(dp=8, recompute="selective", global_batch_size=16), "selective recompute"),
    Point("llama3-8b", _p(dp=8, zero_stage=3, micro_batch_size=2, global_batch_size=32), "micro-batch 2"),
    Point("llama3-8b", _p(dp=8, zero_stage=3, micro_batch_size=4, global_batch_size=64, recompute="full"),
          "micro-batch 4, full recompute"),
    Point("llama3-8b", _p(pp=4, dp=2, schedule="1f1b", global_batch_size=32), "PP 1F1B"),
    Point("llama3-8b", _p(pp=4, dp=2, schedule="gpipe", global_batch_size=8), "PP GPipe"),
    Point("llama3-8b", _p(pp=4, dp=2, schedule="interleaved-1f1b", virtual_stages=2, global_batch_size=32),
          "PP interleaved 1F1B"),
    Point("llama3-8b", _p(pp=4, dp=2, schedule="zero-bubble", global_batch_size=32), "PP zero-bubble"),
    Point("llama3-8b", _p(pp=2, dp=4, zero_stage=3, global_batch_size=32), "PP + ZeRO-3"),
    Point("llama3-8b", _p(pp=2, dp=4, zero_stage=3, recompute="selective", global_batch_size=16),
          "PP + ZeRO-3 + selective recompute"),
    Point("llama3-8b", _p(tp=8, dp=128, zero_stage=3, sequence_parallel=True, global_batch_size=256), "1024 GPUs"),
    # llama3-70b, seq 8192, at 128 to 1024 GPUs
    Point("llama3-70b", _p(tp=8, dp=128, zero_stage=1, recompute="selective", sequence_parallel=True,
                           global_batch_size=512), "Megatron-style, 1024 GPUs", tags=("timed",)),
    Point("llama3-70b", _p(tp=8, dp=16, zero_stage=3, sequence_parallel=True, global_batch_size=32), "TP + ZeRO-3"),
    Point("llama3-70b", _p(pp=2, tp=2, cp=2, zero_stage=3, recompute="selective", sequence_parallel=True,
                           global_batch_size=16), "8 GPUs: PP x TP x CP + ZeRO-3, recomputed (blocks left gathered)"),
    Point("llama3-70b", _p(tp=8, pp=4, dp=32, zero_stage=1, sequence_parallel=True, global_batch_size=256),
          "TP + PP 1F1B, 1024 GPUs"),
    Point("llama3-70b", _p(tp=8, pp=8, dp=16, schedule="interleaved-1f1b", virtual_stages=2, recompute="full",
                           sequence_parallel=True, global_batch_size=256), "TP + interleaved PP, full recompute"),
    # mixtral-8x7b, seq 4096: expert parallelism (the executor runs it with tp=1, cp=1 and ZeRO 0 or 1)
    Point("mixtral-8x7b", _p(dp=8, ep=8, global_batch_size=16), "EP"),
    Point("mixtral-8x7b", _p(dp=64, ep=8, global_batch_size=128), "EP over 64 data-parallel ranks"),
    Point("mixtral-8x7b", _p(dp=8, zero_stage=3, global_batch_size=16), "ZeRO-3, experts replicated"),
    Point("mixtral-8x7b", _p(dp=16, zero_stage=2, micro_batch_size=2, global_batch_size=64), "ZeRO-2, micro-batch 2"),
    Point("mixtral-8x7b", _p(pp=4, dp=2, global_batch_size=32), "PP 1F1B"),
    Point("mixtral-8x7b", _p(tp=2, dp=4, ep=4, global_batch_size=16), "EP + TP"),
    Point("mixtral-8x7b", _p(dp=8, ep=8, zero_stage=1, global_batch_size=16), "EP + ZeRO-1"),
    Point("mixtral-8x7b", _p(dp=64, ep=8, zero_stage=1, global_batch_size=128), "EP + ZeRO-1, experts over 8 ranks"),
    Point("mixtral-8x7b", _p(dp=64, ep=4, zero_stage=1, recompute="full", micro_batch_size=8, global_batch_size=512),
          "EP + ZeRO-1, full recompute, micro-batch 8 (issue 15: estimated 61.2 GiB against 74.4)"),
    Point("mixtral-8x7b", _p(dp=8, ep=8, zero_stage=3, global_batch_size=16), "EP + ZeRO-3 (experts over edp)"),
    Point("mixtral-8x7b", _p(dp=16, ep=8, zero_stage=2, global_batch_size=32), "EP + ZeRO-2"),
    Point("mixtral-8x7b", _p(pp=4, dp=2, ep=2, zero_stage=1, global_batch_size=32), "EP x PP"),
    Point("mixtral-8x7b", _p(tp=2, dp=4, ep=8, sequence_parallel=True, zero_stage=1, global_batch_size=16),
          "EP x TP with SP (ep folded over dp x tp)"),
    # qwen3-30b-a3b, seq 4096: 128 fine-grained experts, top-8
    Point("qwen3-30b-a3b", _p(dp=8, ep=8, zero_stage=1, recompute="selective", global_batch_size=16),
          "fine-grained experts, EP + ZeRO-1, selective recompute"),
    Point("qwen3-30b-a3b", _p(dp=16, ep=8, zero_stage=3, global_batch_size=32), "fine-grained experts, EP + ZeRO-3"),
    Point("mixtral-8x7b", _p(dp=32, pp=8, cp=4, ep=8, zero_stage=2, schedule="zero-bubble", global_batch_size=2048),
          "EP x CP x PP, ZeRO-2: one expert per rank over 16 edp ranks (cut by its second dim)"),
    # deepseek-v3, seq 4096: MLA, 3 dense first layers, 1 shared + 256 routed experts, top-8
    Point("deepseek-v3", _p(pp=8, dp=64, ep=64, zero_stage=1, global_batch_size=1024), "EP x PP, 512 GPUs"),
    Point("deepseek-v3", _p(pp=16, dp=64, ep=32, zero_stage=1, recompute="full", global_batch_size=1024),
          "EP x PP, full recompute, 1024 GPUs"),
    Point("qwen3-235b-a22b", _p(tp=2, pp=8, dp=16, ep=32, sequence_parallel=True, zero_stage=1,
                                global_batch_size=2048), "Megatron-Bridge's H100 layout (TP2 PP8 EP32), 256 GPUs"),
    # expert tensor parallelism (etp: each expert's width split, Megatron-Core's expert_tensor_parallel_size)
    Point("mixtral-8x7b", _p(dp=16, ep=8, etp=2, zero_stage=1, global_batch_size=32),
          "EP x ETP: every expert over 2 ranks beyond ep = the 8 experts"),
    Point("mixtral-8x7b", _p(tp=2, dp=4, ep=4, etp=2, sequence_parallel=True, zero_stage=1, global_batch_size=16),
          "ETP = TP with SP (Megatron-LM's expert layout before folding)"),
    Point("mixtral-8x7b", _p(dp=8, etp=2, zero_stage=3, global_batch_size=16), "ETP alone (ep=1), ZeRO-3"),
    Point("mixtral-8x7b", _p(dp=32, ep=8, etp=4, zero_stage=2, recompute="full", micro_batch_size=2,
                             global_batch_size=128), "EP x ETP 4, ZeRO-2, full recompute, micro-batch 2"),
    Point("qwen3-30b-a3b", _p(dp=16, ep=8, etp=2, zero_stage=3, global_batch_size=32),
          "fine-grained experts (width 768) over EP x ETP, ZeRO-3"),
    Point("qwen3-30b-a3b", _p(tp=2, dp=4, ep=4, etp=2, sequence_parallel=True, zero_stage=1, recompute="selective",
                              global_batch_size=16), "fine-grained experts, ETP = TP with SP, selective recompute"),
]


def _error(est: float, dry: float) -> float:
    return (est - dry) / dry if dry else (0.0 if not est else float("inf"))


def compare(estimated: dict[str, float], measured: dict[str, float]) -> dict:
    """Total and per-category errors of one stage, and whether each is within target."""
    dry_total, est_total = sum(measured.values()), sum(estimated.values())
    categories = {}
    for name in CATEGORIES:
        dry, est = measured.get(name, 0), estimated.get(name, 0)
        small = dry < CATEGORY_FLOOR * dry_total
        within = abs(est - dry) <= (CATEGORY_FLOOR * dry_total if small else CATEGORY_TOLERANCE * dry)
        categories[name] = {"dry_bytes": int(dry), "estimate_bytes": int(est), "error": _error(est, dry),
                            "within": bool(within)}
    total_error = _error(est_total, dry_total)
    within = abs(total_error) <= TOTAL_TOLERANCE and all(c["within"] for c in categories.values())
    return {"dry_bytes": int(dry_total), "estimate_bytes": int(est_total), "error": total_error,
            "within": within, "categories": categories}


def run_point(point: Point, profiles: dict) -> dict:
    plan = ap.Plan(**point.plan)
    row = {"model": point.model, "plan": plan.model_dump(), "describe": plan.describe(), "gpus": plan.gpus,
           "why": point.why}
    if point.model not in profiles:
        profiles[point.model] = ap.profile_model(point.model)
    profile = profiles[point.model]
    coster = Coster(profile, ap.Cluster.preset(CLUSTER, gpus=plan.gpus))
    ranks = coster.rank_costs(plan)
    start = time.perf_counter()
    try:
        dry = ap.dryrun(point.model, plan, stages=point.stages)
    except AutoplanError as err:
        return {**row, "skipped": str(err)}
    row["dryrun_s"] = time.perf_counter() - start
    row["notes"] = dry.notes
    row["stages"] = []
    for stage in dry.stages:
        estimated, moment = rank_peak(ranks[stage.stage].memory, plan, stage.stage, physical=True)
        row["stages"].append({"stage": stage.stage, "dry_phase": stage.peak_phase, "estimate_moment": moment,
                              **compare(estimated, stage.memory_breakdown)})
    row["within"] = all(s["within"] for s in row["stages"])
    return row


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%" if x != float("inf") else "inf"


def markdown(rows: list[dict], summary: dict) -> str:
    lines = ["# Memory truth: the cost model against the dry run", "",
             "Command: `python -m benchmarks.memory_truth`. Each point's plan is dry-run with the executor's code on "
             "a fake process group (`ap.dryrun`: bf16 parameters and gradients, fp32 master weights and Adam moments, "
             "two training steps) and estimated with `ap.estimate` for the dgx-h100 preset; both exclude the "
             "cluster's reserve; the estimate's activations and temporaries are split as the dry run measures them "
             "(`rank_peak(physical=True)`). Errors are estimate / dry run - 1. Target: total within 5%; each "
             "category within 10%, or within 1% of the peak when smaller than that.", "",
             f"**{summary['within']} of {summary['run']} points within target**; {summary['skipped']} skipped "
             f"(the executor refuses them)." + (f" Dry run of llama3-70b on 1024 GPUs: {summary['timed_s']:.1f} s."
                                                 if not math.isnan(summary["timed_s"]) else ""), "",
             "| model | plan | GPUs | stage | dry GiB | est GiB | total | params | grads | optim | activ | temp | "
             "buffers | within | dry run s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['describe']} | {row['gpus']} | - | - | - | skipped: "
                         f"{row['skipped']} | | | | | | | | |")
            continue
        for s in row["stages"]:
            cells = []
            for name in CATEGORIES:
                c = s["categories"][name]
                value = _pct(c["error"]) if c["dry_bytes"] else "{:.1f} GiB/0".format(c["estimate_bytes"] / GIB)
                cells.append(value + ("" if c["within"] else " **x**"))
            lines.append(f"| {row['model']} | {row['describe']} | {row['gpus']} | {s['stage']} | "
                         f"{s['dry_bytes'] / GIB:.1f} | {s['estimate_bytes'] / GIB:.1f} | {_pct(s['error'])} | "
                         + " | ".join(cells) + f" | {'yes' if s['within'] else '**no**'} | {row['dryrun_s']:.1f} |")
    lines += worst_lines(summary, "Worst error per category over the points run (estimate - dry run, over the "
                                  "dry-run value, or over the peak for a category under 1% of it):")
    return "\n".join(lines) + "\n"


def worst_lines(summary: dict, heading: str) -> list[str]:
    """The report's closing list: the worst error of each category, where it was found."""
    return ["", heading, ""] + [f"- {name}: {_pct(worst['error'])} {worst['basis']} ({worst['where']})"
                                for name, worst in summary["worst"].items()]


def summarise(rows: list[dict]) -> dict:
    """Points within target, and the worst error of the total and of each category: relative to the dry-run
    value, or, for a category smaller than 1% of the peak, to the peak (as the target judges them)."""
    run = [r for r in rows if "skipped" not in r]
    worst: dict[str, dict] = {}
    for row in run:
        for s in row["stages"]:
            where = f"{row['model']} {row['describe']} stage {s['stage']}"
            found = [("total", s["error"], "of the total")]
            for name, c in s["categories"].items():
                small = c["dry_bytes"] < CATEGORY_FLOOR * s["dry_bytes"]
                error = (c["estimate_bytes"] - c["dry_bytes"]) / s["dry_bytes"] if small else c["error"]
                found.append((name, error, "of the peak" if small else "of the category"))
            for name, error, basis in found:
                if name not in worst or abs(error) > abs(worst[name]["error"]):
                    worst[name] = {"error": error, "basis": basis, "where": where}
    timed = [r["dryrun_s"] for r in run if r["model"] == "llama3-70b" and r["gpus"] == 1024]
    return {"run": len(run), "within": sum(r["within"] for r in run), "skipped": len(rows) - len(run),
            "worst": worst, "timed_s": min(timed) if timed else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the points whose model or plan contains this text")
    parser.add_argument("--save-as", help="with --only: write the part's results as memory_truth_NAME.{md,json}")
    args = parser.parse_args()
    points = [p for p in GRID if not args.only or args.only in f"{p.model} {ap.Plan(**p.plan).describe()}"]
    profiles: dict = {}
    rows = []
    for point in points:
        row = run_point(point, profiles)
        rows.append(row)
        if "skipped" in row:
            print(f"{row['model']:13s} {row['describe']:90s} skipped: {row['skipped']}")
            continue
        for s in row["stages"]:
            print(f"{row['model']:13s} {row['describe']:90s} stage {s['stage']}: dry {s['dry_bytes'] / GIB:6.1f} GiB "
                  f"est {s['estimate_bytes'] / GIB:6.1f} GiB ({_pct(s['error'])}) "
                  f"{'ok' if s['within'] else 'OFF'}  [{row['dryrun_s']:.1f} s]", flush=True)
    summary = summarise(rows)
    print(f"{summary['within']} of {summary['run']} points within target; {summary['skipped']} skipped")
    if args.only and not args.save_as:
        return  # a partial run does not overwrite the committed results
    name = f"memory_truth_{args.save_as}" if args.only else "memory_truth"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"summary": summary, "points": rows}, indent=2) + "\n")
    text = markdown(rows, summary)
    if args.only:
        text = text.replace("`python -m benchmarks.memory_truth`", f"`python -m benchmarks.memory_truth --only "
                                                                   f"'{args.only}' --save-as {args.save_as}`", 1)
    (RESULTS / f"{name}.md").write_text(text)
    print(f"wrote {RESULTS / (name + '.md')}")


if __name__ == "__main__":
    main()
