"""A known gap of the cost model's memory, measured: the zero-bubble schedule with full recompute.

llama3-8b's shapes with a few blocks, 8 micro-batches per step, zero-bubble over pp = 2 and 4, recompute
none (the control) and full: each pipeline stage's tensor memory from the dry run (executor.dryrun)
against ap.estimate's (the cluster's reserve excluded). docs/dryrun.md, "Known gaps", quotes it.

Run: python -m benchmarks.zero_bubble_recompute   (writes benchmarks/results/zero_bubble_recompute.md)
"""

from __future__ import annotations

from pathlib import Path

import torch

import autoplan as ap

RESULTS = Path(__file__).parent / "results"
CASES = [(2, 4), (4, 8)]  # (pp, blocks)
GIB = 2**30


def _model(blocks: int):
    with torch.device("meta"):
        return ap.models.build_named("llama3-8b", layers=blocks)


def main() -> None:
    rows = []
    for pp, blocks in CASES:
        profile = ap.profile_model(_model(blocks))
        for recompute in ("none", "full"):
            plan = ap.Plan(pp=pp, schedule="zero-bubble", recompute=recompute, global_batch_size=8)
            cluster = ap.Cluster.preset("dgx-h100", gpus=plan.gpus)
            estimate = ap.estimate(profile, cluster, plan)
            for stage in ap.dryrun(_model(blocks), plan, stages="all").stages:
                predicted = estimate.memory_per_stage_bytes[stage.stage] - cluster.memory_reserve_bytes
                rows.append((pp, blocks, recompute, stage.stage, stage.peak_memory_bytes, predicted))
                print(f"pp={pp} blocks={blocks} recompute={recompute:4s} stage {stage.stage}: dry "
                      f"{stage.peak_memory_bytes / GIB:6.2f} GiB, estimate {predicted / GIB:6.2f} GiB "
                      f"({predicted / stage.peak_memory_bytes - 1:+.1%})", flush=True)
    lines = ["# Zero-bubble with full recompute: estimate against dry run", "",
             "Command: `python -m benchmarks.zero_bubble_recompute`. llama3-8b's shapes, 8 micro-batches of 1 "
             "sequence, dgx-h100 preset, tensor memory (reserve excluded).", "",
             "| pp | blocks | recompute | stage | dry run GiB | estimate GiB | error |", "|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {pp} | {blocks} | {rec} | {stage} | {dry / GIB:.2f} | {est / GIB:.2f} | {est / dry - 1:+.1%} |"
              for pp, blocks, rec, stage, dry, est in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zero_bubble_recompute.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'zero_bubble_recompute.md'}")


if __name__ == "__main__":
    main()
