"""The committed CPU benchmark reports, in two rounds on 2 gloo ranks (one per core):

1. `autoplan profile gpt-tiny` measures this machine (GEMM curve, bandwidth, collectives, per-layer times
   and the per-layer overhead fitted from them) -> results/cpu_cluster.json; `autoplan bench` runs
   gpt-tiny and moe-tiny over the search's top plans, the expert defaults and a sample spread over the
   rest of the space -> results/bench_{gpt,moe}_tiny_cpu_profile_only/.
2. `autoplan calibrate` fits the fixed overheads (loop, DTensor, FSDP units, DDP, ring attention,
   pipeline) to ONE model's round-1 runs, and the OTHER model is benched again with that cluster: the
   accuracy of round 2 is on plans and a model the fit never saw -> results/bench_{gpt,moe}_tiny_cpu/.

Targets (each report says met or missed): step-time MAPE <= 15%, Spearman >= 0.9, the picked plan within
5% of the best measured.
Run: python -m benchmarks.bench_cpu [--sample N] [--steps S]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = {"gpt-tiny": "bench_gpt_tiny_cpu", "moe-tiny": "bench_moe_tiny_cpu"}
OTHER = {"gpt-tiny": "moe-tiny", "moe-tiny": "gpt-tiny"}


def _autoplan(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "autoplan", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=12, help="plans beyond the top 5 and the defaults")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--reuse-round-1", action="store_true", help="keep the profile and round 1's results")
    args = parser.parse_args()
    cluster = RESULTS / "cpu_cluster.json"
    bench = ["--gpus", "2", "--global-batch", str(args.global_batch), "--top", "5", "--sample", str(args.sample),
             "--steps", str(args.steps)]
    if not args.reuse_round_1:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "autoplan",
                        "profile", "gpt-tiny", "--out", str(cluster), "--force"], check=True)
        for model, name in MODELS.items():
            _autoplan("bench", model, "--cluster", str(cluster), *bench, "--out", str(RESULTS / f"{name}_profile_only"),
                      "--force")
    for model, name in MODELS.items():
        fitted = RESULTS / f"cpu_cluster_fitted_on_{OTHER[model]}.json"
        _autoplan("calibrate", str(RESULTS / f"{MODELS[OTHER[model]]}_profile_only" / "results.json"),
                  "--cluster", str(cluster), "--model", OTHER[model], "--out", str(fitted), "--force")
        _autoplan("bench", model, "--cluster", str(fitted), *bench, "--out", str(RESULTS / name), "--force")
    print(f"\n{'model':10s} {'cluster':28s} {'plans':>6s} {'ran':>4s} {'MAPE':>7s} {'Spearman':>9s} {'regret':>7s} "
          f"{'mem MAPE':>9s}")
    for model, name in MODELS.items():
        for label, directory in (("profile only", f"{name}_profile_only"),
                                 (f"overheads fitted on {OTHER[model]}", name)):
            acc = json.loads((RESULTS / directory / "results.json").read_text())["accuracy"]
            fmt = lambda key: "-" if acc.get(key) is None else f"{acc[key]:.3f}"
            print(f"{model:10s} {label:28s} {acc['plans']:6d} {acc['measured']:4d} {fmt('step_time_mape'):>7s} "
                  f"{fmt('spearman'):>9s} {fmt('regret'):>7s} {fmt('memory_mape'):>9s}")


if __name__ == "__main__":
    main()
