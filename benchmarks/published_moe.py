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

import autoplan as ap
from benchmarks.published_cases import MOE, cases, profile_case
from benchmarks.published_runs import RESULTS, START, evaluate, fitted_cluster, memory_model, summary

FITTED = RESULTS / "published_runs.json"


def fitted_values(path: Path = FITTED) -> dict[str, float]:
    """The four values fitted to all dense sources (the presets'), or the fit's start values without a report."""
    return json.loads(path.read_text())["fitted"] if path.is_file() else dict(START)


def ep_share(case, params: dict[str, float]) -> float:
    """The dispatcher's share of the predicted step (exposed: the cost model does not overlap it)."""
    est = ap.estimate(profile_case(case), fitted_cluster(case, params), case.plan, stack=case.stack,
                      memory=memory_model(case))
    return est.time_breakdown["ep_comm"] / est.step_time_s


WHY = ["Why they miss (what the cost model does not know of these runs):", "",
       "- the all-to-all is priced whole on the critical path and with tokens sent to every node of the ep group; "
       "Megatron-Core overlaps it with compute and DeepSeek-V3's recipe limits each token to 4 of its 8 nodes "
       "(group-limited routing): the runs with ep spanning nodes come out slow (the 'ep share' column);",
       "- the same Qwen3-30B-A3B configuration is published at 5113-5275 tokens/s/GPU (26.02, 25.11) and at 10494 "
       "(25.09, token-drop): 2x apart, so no one model meets both;",
       "- Megatron-Bridge's recipes recompute chosen modules (their recompute settings are not table columns); the "
       "runs are estimated without recomputation, which is why none is predicted to fit.", ""]


def markdown(rows, params: dict[str, float], skipped, shares: list[float]) -> str:
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
             "| run | GPUs | plan | stack | published s | predicted s | error | 6N@45% error | ep share | GiB | fits |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r, share in zip(rows, shares):
        c = r.case
        lines.append(f"| {c.case_id} | {c.plan.gpus} | {c.plan.describe()} | {c.stack.name}"
                     f"{' fp8' if c.stack.fp8_linears else ''} | {c.published_step_s:.3g} | {r.predicted_s:.3g} | "
                     f"{r.error:+.1%} | {r.baseline_error:+.1%} | {share:.0%} | {r.memory_gib:.1f} | {r.fits} |")
    lines += [""] + WHY
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
    shares = [ep_share(r.case, params) for r in rows]
    (RESULTS / "published_moe.md").write_text(markdown(rows, params, [c for c in all_cases if c.skipped], shares))
    (RESULTS / "published_moe.json").write_text(json.dumps(
        {"summary": s, "fitted": params,
         "runs": [{"case_id": r.case.case_id, "published_step_s": r.case.published_step_s, "predicted_step_s":
                   r.predicted_s, "error": r.error, "baseline_error": r.baseline_error, "memory_gib": r.memory_gib,
                   "fits": r.fits, "plan": r.case.plan.model_dump()} for r in rows]}, indent=1) + "\n")
    print(f"wrote {RESULTS / 'published_moe.md'}, .json")


if __name__ == "__main__":
    main()
