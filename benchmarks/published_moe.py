"""The cost model against published MoE training runs: step time predicted with the values fitted to the
dense published runs (benchmarks/published_runs.py, all sources), so every MoE run is held out, as a new
source is in that report's cross-validation; held to the same targets (median |error| <= 10%, >= 85% within
25%, predicted to fit).

Runs: benchmarks/data/published_runs_moe.json (Megatron-Core MoE recipes on H100 through Megatron-Bridge:
Qwen3-30B-A3B, Qwen3-235B-A22B, DeepSeek-V3; each row cited, with the performance recipe it ran at that
release). Each run is estimated with what its recipe sets (Stack megatron-te with grouped GEMMs, and per run:
the dispatcher, token drop at a capacity factor, the dispatcher's overlap, float8 experts, the modules selective
recompute reruns; DeepSeek-V3's group-limited routing and pipeline layout). Dropless runs are force-balanced by
the source (routing imbalance 1.0); token-drop runs are capped and padded at capacity factor 1.0.

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


def run_estimate(case, params: dict[str, float]) -> ap.Estimate:
    return ap.estimate(profile_case(case), fitted_cluster(case, params), case.plan, stack=case.stack,
                       memory=memory_model(case))


def ep_share(est: ap.Estimate) -> float:
    """The dispatcher's exposed share of the predicted step (all of it where the recipe does not overlap it)."""
    return est.time_breakdown["ep_comm"] / est.step_time_s


def memory_split(est: ap.Estimate) -> str:
    """Model states and activations of the fullest rank, GiB."""
    b = est.memory_breakdown
    states = (b.get("params", 0) + b.get("grads", 0) + b.get("optimizer", 0)) / 2**30
    return f"{states:.0f} / {b.get('activations', 0) / 2**30:.0f}"


def recipe_settings(stack: ap.Stack) -> str:
    """What the cost model takes from the run's recipe beyond the table's columns."""
    parts = [stack.moe_dispatcher]
    if stack.moe_a2a_overlap:
        parts.append("a2a overlap")
    if stack.moe_capacity_factor is not None:
        parts.append(f"capacity {stack.moe_capacity_factor:g}{' padded' if stack.moe_pad_to_capacity else ''}")
    if stack.fp8_linears:
        parts.append("fp8" + (" incl. experts" if stack.fp8_experts else ""))
    if stack.selective_recompute == "modules":
        parts.append("recompute " + "+".join(stack.recompute_modules))
    return ", ".join(parts)


# What-if, not the prediction: an overlapped dispatcher that slows the compute beside it only by the SMs its
# kernels take. DeepSeek-AI 2024 (arXiv:2412.19437, Sec. 3.2.2) runs its all-to-all on 20 of the H800's 132 SMs.
DISPATCHER_SM_SHARE = 20 / 132


def sm_share_step_s(case, params: dict[str, float]) -> float | None:
    """The step predicted with overlap_slowdown = DISPATCHER_SM_SHARE, for a run whose recipe overlaps the
    dispatcher (None otherwise)."""
    if not case.stack.moe_a2a_overlap:
        return None
    cluster = fitted_cluster(case, params).model_copy(update={"overlap_slowdown": DISPATCHER_SM_SHARE})
    return ap.estimate(profile_case(case), cluster, case.plan, stack=case.stack,
                       memory=memory_model(case)).step_time_s


WHY = ["Why they miss (each run's recipe is in the data file; what the cost model still does not know):", "",
       "- Qwen3-235B-A22B (25.11, 26.02): the dispatcher's overlap is on in the recipe and modelled, but at the "
       "overlap cost fitted to the dense runs (overlap=1.00: an overlapped collective slows the compute beside it as "
       "much as it would take exposed) it hides nothing, and the all-to-all over 4 nodes is half the predicted step "
       "('ep share'). Were it to cost only the SMs its kernels take (the what-if column, 20 of 132 SMs as in "
       "DeepSeek-V3's report) they would come out 12-14% fast: the truth lies between, and one fitted number "
       "does not serve dense data parallelism and MoE dispatch both. The 25.09 run of the same layout, not "
       "overlapped and token-drop, is within 8% (BF16 assumed; +1.5% and 78 GiB, fitting, were it FP8).",
       "- Qwen3-30B-A3B (25.11, 26.02): published at half the throughput of the 25.09 run (10494 tokens/s/GPU) "
       "with the same parallel layout (pp 2, ep 8); their recipes differ in force-balanced dropless routing, the dispatcher's overlap "
       "and (26.02) DeepEP, none of which costs 2x in the model or should; the rows are predicted alike and miss "
       "by -42% and -48%. The 25.11 table's MBS 2 / VP 24 also disagree with its recipe (MBS 1, VP 12).",
       "- DeepSeek-V3 (25.09): node-limited routing (4 of 8 nodes) with DeepEP's one copy per node cut the "
       "dispatch from 44% to 30% of the step, overlapped in the recipe but, as above, not hidden at the fitted "
       "overlap cost (-7.6% in the what-if column); the multi-token-prediction layer on the last chunk is not in "
       "the model.",
       "- Memory: a fused MoE path's activations (Stack.fused_moe_activations) replace the eager module's traced "
       "ones; the runs at micro-batch 2 (Qwen3-30B 25.09/25.11) still come out at 98.6 GiB, DeepSeek-V3 at 81 "
       "GiB (float8 activations of the attention's linears are not modelled), and the 25.09 Qwen3-235B run at "
       "88 GiB in BF16 (78 GiB were it FP8, as the table's other H100 MoE rows are).", ""]


def markdown(rows, params: dict[str, float], skipped, estimates: list[ap.Estimate], what_ifs: list) -> str:
    s = summary(rows)
    lines = ["# Published MoE runs: predicted step time against the published one", "",
             "Command: `python -m benchmarks.published_moe`. Each run of `benchmarks/data/published_runs_moe.json` "
             "estimated with its published configuration and the values fitted to the dense published runs ("
             + ", ".join(f"{k}={v:.2f}" for k, v in params.items()) + "): every MoE run is held out.", "",
             f"- runs: {s['runs']}; median |step-time error| **{s['median_abs_error']:.1%}** (6N@45%: "
             f"{s['baseline_median_abs_error']:.1%}); within 10%: {s['within_10']:.0%}; within 25%: "
             f"**{s['within_25']:.0%}**; median signed error {s['median_signed_error']:+.1%}",
             f"- predicted to fit: {s['predicted_to_fit']} of {s['runs']}",
             "- targets (the dense runs'): median <= 10%, >= 85% within 25%, every run predicted to fit",
             f"- the what-if column is not a prediction: the same estimate with overlap_slowdown "
             f"{DISPATCHER_SM_SHARE:.2f} (the SM share of DeepSeek-V3's dispatch kernels) where the recipe overlaps "
             "the dispatcher", "",
             "| run | GPUs | plan | from the recipe | published s | predicted s | error | 6N@45% error | ep share | "
             f"what-if: overlap at {DISPATCHER_SM_SHARE:.2f} | GiB | states / activations GiB | fits |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r, est, what_if in zip(rows, estimates, what_ifs):
        c = r.case
        alt = f"{what_if / c.published_step_s - 1:+.1%}" if what_if else ""
        lines.append(f"| {c.case_id} | {c.plan.gpus} | {c.plan.describe()} | {recipe_settings(c.stack)} | "
                     f"{c.published_step_s:.3g} | {r.predicted_s:.3g} | {r.error:+.1%} | {r.baseline_error:+.1%} | "
                     f"{ep_share(est):.0%} | {alt} | {r.memory_gib:.1f} | {memory_split(est)} | {r.fits} |")
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
    estimates = [run_estimate(r.case, params) for r in rows]
    what_ifs = [sm_share_step_s(r.case, params) for r in rows]
    (RESULTS / "published_moe.md").write_text(markdown(rows, params, [c for c in all_cases if c.skipped], estimates,
                                                       what_ifs))
    (RESULTS / "published_moe.json").write_text(json.dumps(
        {"summary": s, "fitted": params,
         "runs": [{"case_id": r.case.case_id, "published_step_s": r.case.published_step_s, "predicted_step_s":
                   r.predicted_s, "error": r.error, "baseline_error": r.baseline_error, "memory_gib": r.memory_gib,
                   "fits": r.fits, "plan": r.case.plan.model_dump()} for r in rows]}, indent=1) + "\n")
    print(f"wrote {RESULTS / 'published_moe.md'}, .json")


if __name__ == "__main__":
    main()
