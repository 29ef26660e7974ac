"""The MoE models of issue "MoE that plans and runs" through search -> estimate -> dry run at 64-1024 GPUs: the
search ranks only plans the executor runs (the default), and its best plan's dry run (the executor's code on a
fake process group, executor.dryrun) of the first and last stages and the estimate's fullest is held to the
estimate's memory of each (tensor bytes, the preset's reserve left out). A configuration where nothing fits
is a row that says so.

    python -m benchmarks.moe_best_plans        # writes benchmarks/results/moe_best_plans.md
"""

from __future__ import annotations

import time
from pathlib import Path

import autoplan as ap
from autoplan.errors import AutoplanError

RESULTS = Path(__file__).parent / "results" / "moe_best_plans.md"
TARGET = 0.05
# (model, GPUs, global batch in sequences)
CASES = [
    ("mixtral-8x7b", 64, 256),
    ("mixtral-8x7b", 1024, 2048),
    ("qwen3-235b-a22b", 64, 512),
    ("qwen3-235b-a22b", 1024, 2048),
    ("deepseek-v3", 256, 1024),
    ("deepseek-v3", 1024, 4096),
]


def measure(model: str, gpus: int, batch: int) -> dict:
    row = {"model": model, "gpus": gpus, "batch": batch}
    profile = ap.profile_model(model)
    cluster = ap.Cluster.preset("dgx-h100", gpus=gpus)
    start = time.perf_counter()
    try:
        result = ap.search(profile, cluster, global_batch_size=batch, top_k=1)
    except AutoplanError as error:
        return {**row, "error": str(error).splitlines()[0]}
    row["search_s"] = time.perf_counter() - start
    plan, estimate = result.best, result.best_estimate
    # the first and last stages and the estimate's fullest one, each held to the estimate of that same stage
    stages = sorted({0, plan.pp - 1, estimate.peak_stage})
    start = time.perf_counter()
    try:
        dry = ap.dryrun(model, plan, gpus=gpus, stages=stages)
    except Exception as error:  # a best plan whose dry run fails is a finding: the row says so
        return {**row, "error": f"{plan.describe()}: dry run failed: {type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''}"}
    reserve = estimate.memory_breakdown.get("reserve", 0)
    pairs = [(s.stage, estimate.memory_per_stage_bytes[s.stage] - reserve, s.peak_memory_bytes) for s in dry.stages]
    worst = max(pairs, key=lambda pair: abs(pair[1] / pair[2] - 1))
    peak = next(pair for pair in pairs if pair[0] == estimate.peak_stage)
    return {**row, "plan": plan.describe(), "step_s": estimate.step_time_s, "dry_run_s": time.perf_counter() - start,
            "stages": stages, "peak_stage": peak[0], "estimate_bytes": peak[1], "dry_run_bytes": peak[2],
            "worst_stage": worst[0], "worst_error": worst[1] / worst[2] - 1}


def main() -> None:
    rows = [measure(*case) for case in CASES]
    lines = ["# MoE models: the search's best runnable plan, dry-run", "",
             "Command: `python -m benchmarks.moe_best_plans`. dgx-h100 preset, sequence length of each model's "
             "config; `ap.search` (plans the executor runs only, its default), then `ap.dryrun` of the best plan's first "
             "and last pipeline stages and the estimate's fullest stage, each held to the estimate of the same stage. "
             f"Memory: tensor bytes per GPU, the preset's reserve left out; target: every stage run within {TARGET:.0%}. "
             "The GiB columns are the estimate's fullest stage.", "",
             "| model | GPUs | global batch | best plan | step s | stages run | estimate GiB | dry run GiB | error | "
             "worst stage | within |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['gpus']} | {r['batch']} | {r['error']} | - | - | - | - | - | - | - |")
            continue
        error = r["estimate_bytes"] / r["dry_run_bytes"] - 1
        lines.append(f"| {r['model']} | {r['gpus']} | {r['batch']} | {r['plan']} | {r['step_s']:.2f} | "
                     f"{', '.join(map(str, r['stages']))} (fullest {r['peak_stage']}) | "
                     f"{r['estimate_bytes'] / 2**30:.2f} | {r['dry_run_bytes'] / 2**30:.2f} | {error:+.2%} | "
                     f"{r['worst_stage']}: {r['worst_error']:+.2%} | "
                     f"{'yes' if abs(r['worst_error']) <= TARGET else '**no**'} |")
    lines += ["", "Times on this 2-core machine: " + ", ".join(
        f"{r['model']} x {r['gpus']}: search {r['search_s']:.1f} s, dry run {r['dry_run_s']:.1f} s"
        for r in rows if "error" not in r) + "."]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
