"""The cost model against published MoE training runs: step time predicted with the values fitted to the
dense published runs (benchmarks/published_runs.py, all sources), so every MoE run is held out, as a new
source is in that report's cross-validation; held to the same targets (median |error| <= 10%, >= 85% within
25%, predicted to fit).

Runs: benchmarks/data/published_runs_moe.json (Megatron-Core MoE recipes on H100 through Megatron-Bridge:
Qwen3-30B-A3B, Qwen3-235B-A22B, DeepSeek-V3; each row cited). The source force-balances routing, so the runs
are estimated at a routing imbalance of 1.0; Megatron-Core runs experts as grouped GEMMs with the all-to-all
dispatcher (Stack megatron-te, grouped_gemm).

Run: python -m benchmarks.published_moe   (about a minute; writes benchmarks/results/published_moe.{md,json})
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.published_cases import MOE, cases
from benchmarks.published_runs import RESULTS, START, evaluate, summary

FITTED = RESULTS / "published_runs.json"


def fitted_values(path: Path = FITTED) -> dict[str, float]:
    """The four values fitted to all dense sources (the presets'), or the fit's start values without a report."""
    return json.loads(path.read_text())["fitted"] if path.is_file() else dict(START)


def markdown(rows, params: dict[str, float], skipped) -> str:
    s = summary(rows)
    lines = ["# Published MoE runs: predicted step time against the published one", "",
             "Command: `python -m benchmarks.published_moe`. Each run of `benchmarks/data/published_runs_moe.json` "
             "estimated with its published configuration and the values fitted to the dense published runs ("
             + ", ".join(f"{k}={v:.2f}" for k, v in params.items()) + "): every MoE run is held out.", "",
             f"- runs: {s['runs']}; median |step-time error| **{s['median_abs_error']:.1%}** (6N@45%: "
             f"{s['baseline_median_abs_error']:.1%}); within 10%: {s['within_10']:.0%}; within 25%: "
             f"**{s['within_25']:.0%}**; median signed error {s['median_signed_error']:+.1%}",
             f"- predicted to fit: {s['predicted_to_fit']} of {s['runs']}",
             "- targets (the dense runs'): median <= 10%, >= 85% within 25%, every run predicted to fit", "",
             "| run | GPUs | plan | stack | published s | predicted s | error | 6N@45% error | GiB | fits |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        c = r.case
        lines.append(f"| {c.case_id} | {c.plan.gpus} | {c.plan.describe()} | {c.stack.name}"
                     f"{' fp8' if c.stack.fp8_linears else ''} | {c.published_step_s:.3g} | {r.predicted_s:.3g} | "
                     f"{r.error:+.1%} | {r.baseline_error:+.1%} | {r.memory_gib:.1f} | {r.fits} |")
    assumed = [r.case for r in rows if r.case.assumptions]
    if assumed:
        lines += ["", "Assumptions where the source is silent:", ""]
        lines += [f"- {c.case_id}: {'; '.join(c.assumptions)}" for c in assumed]
    if skipped:
        lines += ["", "Not estimated:", ""] + [f"- {c.case_id}: {c.skipped}" for c in skipped]
    return "\n".join(lines) + "\n"


def main() -> None:
    all_cases = cases((MOE,))
    items = [c for c in all_cases if not c.skipped]
    params = fitted_values()
    rows = evaluate(items, params)
    s = summary(rows)
    for r in rows:
        print(f"{r.case.case_id:42s} published {r.case.published_step_s:8.2f} s  predicted {r.predicted_s:8.2f} s  "
              f"{r.error:+7.1%}  fits {r.fits}")
    print(f"median |error| {s['median_abs_error']:.1%}, within 25% {s['within_25']:.0%}, fit {s['predicted_to_fit']}/{s['runs']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "published_moe.md").write_text(markdown(rows, params, [c for c in all_cases if c.skipped]))
    (RESULTS / "published_moe.json").write_text(json.dumps(
        {"summary": s, "fitted": params,
         "runs": [{"case_id": r.case.case_id, "published_step_s": r.case.published_step_s, "predicted_step_s":
                   r.predicted_s, "error": r.error, "baseline_error": r.baseline_error, "memory_gib": r.memory_gib,
                   "fits": r.fits, "plan": r.case.plan.model_dump()} for r in rows]}, indent=1) + "\n")
    print(f"wrote {RESULTS / 'published_moe.md'}, .json")


if __name__ == "__main__":
    main()
