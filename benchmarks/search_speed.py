"""Speed of `ap.search` on this machine against the planner's targets, and what it finds.

Targets (issue "Planner"): llama3-70b on 1024 dgx-h100 GPUs < 10 s; llama3-405b on 16384 GPUs < 60 s;
mixtral-8x7b on 64 GPUs < 10 s. Each case runs in a fresh process; search time excludes profiling,
which is reported beside it.
Run: python -m benchmarks.search_speed   (writes benchmarks/results/search_speed.{md,json})
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = [("llama3-70b", 1024, 512, 10.0), ("llama3-405b", 16384, 2048, 60.0), ("mixtral-8x7b", 64, 512, 10.0)]

_CHILD = """
import json, sys, time
import autoplan as ap
name, gpus, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
profile = ap.profile_model(name)
t1 = time.perf_counter()
result = ap.search(profile, ap.Cluster.preset("dgx-h100", gpus=gpus), global_batch_size=batch, top_k=5)
t2 = time.perf_counter()
best = result.best_estimate
defaults = {k: (v[0].describe(), v[1].step_time_s, v[1].mfu) if v else None for k, v in result.baselines.items()}
print(json.dumps({"profile_s": t1 - t0, "search_s": t2 - t1, "best": result.best.describe(),
                  "step_time_s": best.step_time_s, "mfu": best.mfu, "memory_gib": best.memory_per_gpu_bytes / 2**30,
                  "considered": result.candidates_considered, "pruned": result.candidates_pruned,
                  "ilp_solves": result.ilp_solves, "gap": result.optimality_gap, "expert_defaults": defaults}))
"""


def main() -> None:
    rows = []
    for name, gpus, batch, target in CASES:
        out = subprocess.run([sys.executable, "-c", _CHILD, name, str(gpus), str(batch)], check=True,
                             capture_output=True, text=True).stdout
        row = {"model": name, "gpus": gpus, "global_batch": batch, "target_s": target, **json.loads(out)}
        rows.append(row)
        verdict = "met" if row["search_s"] < target else "MISSED"
        print(f"{name:13s} {gpus:6d} GPUs: search {row['search_s']:6.2f} s (target < {target:.0f} s, {verdict}); "
              f"profile {row['profile_s']:.2f} s; best {row['best']} -> {row['step_time_s']:.3f} s, "
              f"MFU {row['mfu']:.1%}, gap {row['gap']:.2%}")
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Search speed", "", f"Command: `python -m benchmarks.search_speed` ({meta['machine']}, {meta['date']}).",
             "Search time excludes profiling (shown beside it). Cluster preset dgx-h100.", "",
             "| model | GPUs | global batch | search (s) | target (s) | profile (s) | configurations evaluated | "
             "ILPs | best plan | step (s) | MFU | gap to bound |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['gpus']} | {r['global_batch']} | {r['search_s']:.2f} | < {r['target_s']:.0f} | "
                     f"{r['profile_s']:.2f} | {r['considered']} | {r['ilp_solves']} | {r['best']} | "
                     f"{r['step_time_s']:.3f} | {r['mfu']:.1%} | {r['gap']:.2%} |")
    lines += ["", "Expert defaults (fastest fitting variant of each) under the same cost model:", "",
              "| model | default | plan | step (s) | MFU |", "|---|---|---|---:|---:|"]
    for r in rows:
        for name, found in r["expert_defaults"].items():
            lines.append(f"| {r['model']} | {name} | {found[0] if found else 'none fits / not possible'} | "
                         f"{found[1]:.3f} | {found[2]:.1%} |" if found else
                         f"| {r['model']} | {name} | none fits / not possible | - | - |")
    (RESULTS / "search_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
