"""Speed of the foundation: profiling named models on meta (time, peak RSS) and one estimate (time).

Targets (issue "Foundation"): profiling llama3-405b takes seconds and < 2 GB of RAM; one estimate
takes well under a millisecond. Each model is profiled in a fresh process so its peak RSS is its own.
Run: python -m benchmarks.foundation_speed   (writes benchmarks/results/foundation_speed.{md,json})
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = ["gpt3-175b", "llama3-8b", "llama3-70b", "llama3-405b", "mixtral-8x7b"]
PLANS = {  # a realistic plan per model, on dgx-h100 presets
    "gpt3-175b": dict(gpus=1024, dp=16, tp=8, pp=8, zero_stage=1, recompute="selective", sequence_parallel=True,
                      global_batch_size=1536, schedule="interleaved-1f1b", virtual_stages=3),
    "llama3-8b": dict(gpus=64, dp=8, tp=8, pp=1, zero_stage=1, recompute="none", sequence_parallel=True,
                      global_batch_size=512),
    "llama3-70b": dict(gpus=1024, dp=16, tp=8, pp=8, zero_stage=1, recompute="selective", sequence_parallel=True,
                       global_batch_size=512, schedule="interleaved-1f1b", virtual_stages=5),
    "llama3-405b": dict(gpus=16384, dp=128, tp=8, pp=16, zero_stage=1, recompute="full", sequence_parallel=True,
                        global_batch_size=2048, schedule="interleaved-1f1b", virtual_stages=2),
    "mixtral-8x7b": dict(gpus=64, dp=8, tp=8, pp=1, ep=8, zero_stage=1, recompute="selective", sequence_parallel=True,
                         global_batch_size=512),
}

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import autoplan as ap
t1 = time.perf_counter()
profile = ap.profile_model(sys.argv[1])
t2 = time.perf_counter()
spec = json.loads(sys.argv[2])
gpus = spec.pop("gpus")
cluster = ap.Cluster.preset("dgx-h100", gpus=gpus)
plan = ap.Plan(**spec)
ap.estimate(profile, cluster, plan)
n = 2000
t3 = time.perf_counter()
for _ in range(n):
    est = ap.estimate(profile, cluster, plan)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "profile_s": t2 - t1, "estimate_ms": (t4 - t3) / n * 1e3,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "params": profile.total_params, "layers": len(profile.layers), "mfu": est.mfu}))
"""


def main() -> None:
    rows = []
    print(f"{'model':14s} {'params':>8s} {'profile s':>9s} {'peak RSS GB':>11s} {'estimate ms':>11s}")
    for name in MODELS:
        out = subprocess.run([sys.executable, "-c", _CHILD, name, json.dumps(PLANS[name])], check=True,
                             capture_output=True, text=True).stdout
        row = {"model": name, **json.loads(out)}
        rows.append(row)
        print(f"{name:14s} {row['params'] / 1e9:7.1f}B {row['profile_s']:9.2f} {row['peak_rss_bytes'] / 1e9:11.2f} "
              f"{row['estimate_ms']:11.3f}")
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {platform.python_version()}", "date": time.strftime("%Y-%m-%d")}
    (RESULTS / "foundation_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Foundation speed", "", f"Command: `python -m benchmarks.foundation_speed` ({meta['machine']}, "
             f"{meta['date']}). Targets: profiling llama3-405b in seconds with < 2 GB RAM; an estimate well under 1 ms.",
             "", "| model | params | profile (s) | peak RSS (GB) | one estimate (ms) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['params'] / 1e9:.1f}B | {r['profile_s']:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
              f"{r['estimate_ms']:.3f} |" for r in rows]
    (RESULTS / "foundation_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
