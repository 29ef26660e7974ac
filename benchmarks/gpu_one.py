"""One-GPU plans measured on a real GPU against the cost model: step time and peak memory.

Two parts, so that the GPU is held only while it measures:

1. `measure` (on the GPU): runs each one-GPU plan (micro-batch x recompute) of each model with autoplan's
   executor (bf16 parameters, fp32 master weights and AdamW states, as `autoplan run` does on CUDA) in one
   process, and records the median step time (the first step left out), the peak of allocated memory and
   the losses; then profiles the GPU with `autoplan profile MODEL` (GEMM curve, memory bandwidth, attention,
   per-layer times) into cluster.json. nvidia-smi's clocks and power are sampled all along (smi.csv).
   A plan that runs out of memory is recorded as such: the cost model's "does not fit" is checked too.
2. `report` (anywhere): estimates each measured plan with the cluster preset (its numbers fitted on
   published runs, never on these) and with the profiled cluster, dry-runs its memory, and writes
   benchmarks/results/gpu_one_<tag>.{md,json}: step-time error per plan, MAPE, Spearman, whether the
   plan the cost model ranks first is the fastest measured, memory against the estimate and the dry run.

Run: python -m benchmarks.gpu_one measure --out DIR [--models llama3.2-1b,llama3.2-3b] [--deadline-s 400]
     python -m benchmarks.gpu_one report DIR [--tag h200] [--cluster dgx-h200] [--profiled CLUSTER] [--noise DIR2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
RECOMPUTE = ("none", "selective", "full")


# ---------------------------------------------------------------------------------------------- measure
def _one_plan(name: str, plan, *, seq_len: int, steps: int, device) -> dict:
    """Train `plan` for `steps` steps in this process: median step time (steps 1..), peak allocated memory."""
    import torch

    from autoplan.executor import apply, train
    from autoplan.models import build_named

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = build_named(name, seq_len=seq_len)
    model.init_weights(seed=0)
    if cuda:
        model.to(torch.bfloat16)  # as `autoplan run` on CUDA: AdamW keeps fp32 master weights
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    par = apply(model, plan, device_type=device.type)
    records = train(par, steps=steps, seq_len=seq_len, vocab=model.config.vocab, device=device, log=None)
    times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
    out = {"step_times_s": [r["step_time_s"] for r in records], "median_step_time_s": statistics.median(times),
           "losses": [r["loss"] for r in records]}
    if cuda:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _plans(global_batch: int, micro_batches: list[int], recompute_modes=RECOMPUTE, repeat: int = 1,
           offloads=("none",)):
    from autoplan.schema import Plan

    for mb in micro_batches:
        for recompute in recompute_modes:
            for offload in offloads:
                for _ in range(repeat):
                    yield Plan(micro_batch_size=mb, global_batch_size=global_batch, recompute=recompute,
                               offload=offload)


def _host_link(device) -> dict:
    """Pinned host <-> device copy bandwidth (what offloaded states cross each step), GB/s each way."""
    import torch

    host = torch.empty(2**28, dtype=torch.bfloat16, pin_memory=True)  # 512 MiB
    dev = torch.empty_like(host, device=device)
    rates = {}
    for name, copy in (("to_device", lambda: dev.copy_(host, non_blocking=True)),
                       ("to_host", lambda: host.copy_(dev, non_blocking=True))):
        copy()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            copy()
        torch.cuda.synchronize(device)
        rates[name + "_gb_per_s"] = 5 * host.numel() * 2 / (time.perf_counter() - start) / 1e9
    return rates


def _environment(device) -> dict:
    import torch

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
           "python": platform.python_version(), "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                   cuda=torch.version.cuda)
    return env


def measure(args) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    begin = time.monotonic()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    smi = None
    if device.type == "cuda":
        try:
            smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,"
                                    "temperature.gpu,utilization.gpu", "--format=csv", "-lms", "500"],
                                   stdout=open(out / "smi.csv", "w"), stderr=subprocess.DEVNULL)
        except OSError:
            smi = None
    result = {"environment": _environment(device), "seq_len": args.seq_len, "global_batch": args.global_batch,
              "steps": args.steps, "runs": []}
    models = args.models.split(",")
    if device.type == "cuda":
        result["host_link"] = _host_link(device)
        result["environment"]["cpu_count"] = os.cpu_count()
    try:
        for index, name in enumerate(models):
            for plan in _plans(args.global_batch, [int(m) for m in args.micro_batches.split(",")],
                               args.recompute.split(","), args.repeat, args.offload.split(",")):
                if time.monotonic() - begin > args.deadline_s:
                    print(f"deadline: {name} {plan.describe()} not run", flush=True)
                    continue
                run = {"model": name, "plan": plan.model_dump(exclude_defaults=True)}
                started = time.monotonic()
                try:
                    run.update(_one_plan(name, plan, seq_len=args.seq_len, steps=args.steps, device=device))
                except torch.OutOfMemoryError as err:
                    run["out_of_memory"] = str(err).splitlines()[0][:200]
                run["wall_s"] = round(time.monotonic() - started, 1)
                _free(device)
                result["runs"].append(run)
                (out / "measured.json").write_text(json.dumps(result, indent=1))
                shown = ("OOM" if "out_of_memory" in run else
                         f"{run['median_step_time_s'] * 1e3:8.1f} ms  "
                         f"{run.get('peak_allocated_bytes', 0) / GIB:6.2f} GiB")
                print(f"{name:14s} {plan.describe():44s} {shown}  ({run['wall_s']} s)", flush=True)
            if index == 0 and not args.no_profile:  # the profile after the first model: its plans matter most
                left = args.deadline_s - (time.monotonic() - begin)
                if left > 60:
                    _profile(name, out / "cluster.json", timeout_s=min(args.profile_timeout_s, left - 30))
    finally:
        if smi is not None:
            smi.terminate()
    result["wall_s"] = round(time.monotonic() - begin, 1)
    (out / "measured.json").write_text(json.dumps(result, indent=1))
    return 0


def _profile(model: str, path: Path, *, timeout_s: float) -> None:
    command = [sys.executable, "-m", "autoplan", "profile", model, "--out", str(path), "--force"]
    try:
        done = subprocess.run(command, timeout=timeout_s, capture_output=True, text=True)
        print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
    except subprocess.TimeoutExpired:
        print(f"profile: stopped after {timeout_s:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------- report
def _estimates(measured: dict, clusters: dict, *, dry_run: bool) -> list[dict]:
    import autoplan as ap

    rows, profiles = [], {}
    for run in measured["runs"]:
        name, plan = run["model"], ap.Plan(**run["plan"])
        if name not in profiles:
            profiles[name] = ap.profile_model(name, seq_len=measured["seq_len"])
        row = {"model": name, "plan": plan.describe(), "recompute": plan.recompute, "mb": plan.micro_batch_size,
               "measured_s": run.get("median_step_time_s"), "out_of_memory": "out_of_memory" in run,
               "measured_peak_bytes": run.get("peak_allocated_bytes")}
        for label, cluster in clusters.items():
            est = ap.estimate(profiles[name], cluster, plan)
            row[f"{label}_s"] = est.step_time_s
            row[f"{label}_fits"] = est.fits
            row["estimate_peak_bytes"] = est.memory_per_gpu_bytes - cluster.memory_reserve_bytes
        if dry_run and run.get("peak_allocated_bytes"):
            row["dryrun_peak_bytes"] = ap.dryrun(name, plan, gpus=1, seq_len=measured["seq_len"]).peak_memory_bytes
        rows.append(row)
    return rows


def _summary(rows: list[dict], label: str) -> dict:
    from autoplan.report.accuracy import spearman

    ran = [r for r in rows if r["measured_s"]]
    errors = [r[f"{label}_s"] / r["measured_s"] - 1 for r in ran]
    out = {"plans": len(ran), "mape": statistics.mean(abs(e) for e in errors) if errors else None,
           "median_error": statistics.median(errors) if errors else None}
    for model in sorted({r["model"] for r in ran}):
        mine = [r for r in ran if r["model"] == model]
        fit = [r for r in mine if r[f"{label}_fits"]] or mine
        pick = min(fit, key=lambda r: r[f"{label}_s"])
        best = min(mine, key=lambda r: r["measured_s"])
        out[model] = {"spearman": spearman([r[f"{label}_s"] for r in mine], [r["measured_s"] for r in mine])
                      if len(mine) > 2 else None,
                      "pick": pick["plan"], "pick_vs_best": pick["measured_s"] / best["measured_s"] - 1}
    return out


def report(args) -> int:
    import autoplan as ap

    folder = Path(args.folder)
    measured = json.loads((folder / "measured.json").read_text())
    clusters = {"preset": ap.Cluster.preset(args.cluster, gpus=1)}
    profiled = Path(args.profiled) if args.profiled else folder / "cluster.json"
    if profiled.exists():
        clusters["profiled"] = ap.Cluster.load(profiled)
    rows = _estimates(measured, clusters, dry_run=not args.no_dry_run)
    summaries = {label: _summary(rows, label) for label in clusters}
    env = measured["environment"]
    lines = [f"# One-GPU plans on {env.get('gpu', env['device'])}: measured vs predicted", "",
             f"Measured {env['date']} with torch {env['torch']} (`python -m benchmarks.gpu_one measure`), reported by "
             f"`python -m benchmarks.gpu_one report`. Each plan: {measured['steps']} optimizer steps of "
             f"{measured['global_batch']} sequences x {measured['seq_len']} tokens, bf16 parameters with fp32 master "
             "weights and AdamW (autoplan's executor, eager PyTorch); the step time is the median of the steps after "
             "the first. `preset`: the cost model with the "
             f"`{args.cluster}` preset, whose fitted numbers come from published runs only; `profiled`: with the "
             f"cluster `autoplan profile` measured on this GPU ({profiled.relative_to(folder.parent) if profiled.is_relative_to(folder.parent) else profiled.name}), "
             "which has the host's issue time per block (`host_block_s`: a block costs max(device, host)). "
             "Memory: peak allocated bytes (torch.cuda) vs the "
             "estimate and the dry run (the executor on fake tensors), the cluster's reserve excluded.", ""]
    if "profiled" in clusters and clusters["profiled"].host_block_s:
        lines += ["Host issue time per block (fwd + bwd, profiler.host): " + ", ".join(
            f"{mode} {sec * 1e3:.1f} ms" for mode, sec in clusters["profiled"].host_block_s.items()) + ".", ""]
    for label, s in summaries.items():
        if s["mape"] is None:
            continue
        lines.append(f"- **{label}**: {s['plans']} plans, step-time MAPE {s['mape']:.1%}, median signed error "
                     f"{s['median_error']:+.1%}; " + "; ".join(
                         f"{m}: Spearman {v['spearman']:.2f}, the pick ({v['pick']}) runs {v['pick_vs_best']:+.1%} "
                         "vs the fastest measured" for m, v in s.items() if isinstance(v, dict) and v["spearman"] is not None))
    lines += ["", "| model | plan | measured | " + " | ".join(f"{c} | err" for c in clusters)
              + " | peak GiB | estimate | err | dry run | err |",
              "|---|---|---:|" + "---:|---:|" * len(clusters) + "---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["model"], r["plan"], "OOM" if r["out_of_memory"] else f"{r['measured_s'] * 1e3:.0f} ms"]
        for label in clusters:
            fits = "" if r[f"{label}_fits"] else " (no fit)"
            err = f"{r[f'{label}_s'] / r['measured_s'] - 1:+.1%}" if r["measured_s"] else "-"
            cells += [f"{r[f'{label}_s'] * 1e3:.0f} ms{fits}", err]
        peak, est, dry = r["measured_peak_bytes"], r["estimate_peak_bytes"], r.get("dryrun_peak_bytes")
        cells += [f"{peak / GIB:.2f}" if peak else "-", f"{est / GIB:.2f}", f"{est / peak - 1:+.1%}" if peak else "-",
                  f"{dry / GIB:.2f}" if dry else "-", f"{dry / peak - 1:+.1%}" if dry and peak else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    smi = folder / "smi.csv"
    if smi.exists():
        lines += ["", _clock_line(smi)]
    noise = _noise(Path(args.noise), measured) if args.noise else None
    if noise:
        lines += ["", "## Noise floor", "", noise["text"]]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"gpu_one_{args.tag}.md").write_text("\n".join(lines) + "\n")
    (results / f"gpu_one_{args.tag}.json").write_text(json.dumps(
        {"environment": env, "summaries": summaries, "rows": rows, "noise": noise}, indent=1))
    print("\n".join(lines))
    return 0


def _noise(folder: Path, first: dict) -> dict:
    """The same plans run several times in one process (folder/measured.json, `measure --repeat`): the spread
    within that run, and its median against the first run's (another lease of the same kind of machine)."""
    runs = json.loads((folder / "measured.json").read_text())["runs"]
    by_plan: dict[tuple, list[float]] = {}
    for run in runs:
        if run.get("median_step_time_s"):
            by_plan.setdefault((run["model"], json.dumps(run["plan"], sort_keys=True)), []).append(run["median_step_time_s"])
    firsts = {(r["model"], json.dumps(r["plan"], sort_keys=True)): r.get("median_step_time_s") for r in first["runs"]}
    rows, text = [], ["| model | plan | runs | spread (max/min - 1) | median vs the first lease |", "|---|---|---:|---:|---:|"]
    import autoplan as ap

    for (model, plan), times in by_plan.items():
        spread, median, before = max(times) / min(times) - 1, statistics.median(times), firsts.get((model, plan))
        rows.append({"model": model, "plan": plan, "runs": len(times), "spread": spread,
                     "vs_first": median / before - 1 if before else None})
        shown = f"{rows[-1]['vs_first']:+.1%}" if before else "-"
        text.append(f"| {model} | {ap.Plan(**json.loads(plan)).describe()} | {len(times)} | {spread:.1%} | {shown} |")
    within = statistics.median(r["spread"] for r in rows)
    between = [abs(r["vs_first"]) for r in rows if r["vs_first"] is not None]
    summary = (f"Within one lease the same plan's step time spreads {within:.1%} (median over {len(rows)} plans); "
               + (f"between two leases of the same machine kind it differs by {statistics.median(between):.1%} "
                  f"(median; up to {max(between):.1%})." if between else ""))
    return {"rows": rows, "within": within, "between": statistics.median(between) if between else None,
            "text": summary + "\n\n" + "\n".join(text)}


def _clock_line(path: Path) -> str:
    """The SM clock and power nvidia-smi read while the GPU was busy (utilization >= 90%)."""
    clocks, powers = [], []
    for line in path.read_text().splitlines()[1:]:
        cells = [c.strip().split(" ")[0] for c in line.split(",")]
        try:
            if float(cells[5]) >= 90:
                clocks.append(float(cells[1]))
                powers.append(float(cells[3]))
        except (IndexError, ValueError):
            continue
    if not clocks:
        return "nvidia-smi: no busy samples."
    return (f"nvidia-smi while busy ({len(clocks)} samples, utilization >= 90%): SM clock median "
            f"{statistics.median(clocks):.0f} MHz (min {min(clocks):.0f}), power median {statistics.median(powers):.0f} W.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="run the one-GPU plans here (a GPU; CPU for a smoke test)")
    m.add_argument("--out", required=True)
    m.add_argument("--models", default="llama3.2-1b,llama3.2-3b")
    m.add_argument("--micro-batches", default="1,2,4,8")
    m.add_argument("--global-batch", type=int, default=8)
    m.add_argument("--seq-len", type=int, default=4096)
    m.add_argument("--steps", type=int, default=5)
    m.add_argument("--recompute", default=",".join(RECOMPUTE))
    m.add_argument("--repeat", type=int, default=1, help="run each plan this many times (the noise floor)")
    m.add_argument("--offload", default="none", help="offload modes to run, e.g. none,optimizer")
    m.add_argument("--deadline-s", type=float, default=400, help="start no plan after this many seconds")
    m.add_argument("--profile-timeout-s", type=float, default=150)
    m.add_argument("--no-profile", action="store_true")
    r = sub.add_parser("report", help="estimate the measured plans and write the report")
    r.add_argument("folder")
    r.add_argument("--tag", default="h200")
    r.add_argument("--cluster", default="dgx-h200")
    r.add_argument("--no-dry-run", action="store_true")
    r.add_argument("--profiled", help="the profiled cluster.json (default: FOLDER/cluster.json)")
    r.add_argument("--noise", help="a folder of `measure --repeat` runs: the noise floor")
    r.add_argument("--results", default=str(RESULTS), help="where the report goes")
    args = parser.parse_args(argv)
    return measure(args) if args.command == "measure" else report(args)


if __name__ == "__main__":
    sys.exit(main())
