"""Overhead of the autoplan executor against a plain hand-written torch script on this machine.

The same model, batch shapes, optimizer and ranks: `autoplan launch` with a plan, and
benchmarks/plain_train.py (DDP or FSDP2 by hand), each under torchrun with 2 ranks (one per core). The
median step time over the steps after the first (warm-up); the two runs alternate, several rounds.
Target: autoplan within 5% of the plain script.
Run: python -m benchmarks.executor_overhead   (writes benchmarks/results/executor_overhead.{md,json})
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
STEPS, ROUNDS, HIDDEN = 12, 3, 256
CASES = [("DDP (ZeRO-0)", 0), ("FSDP2 (ZeRO-3)", 3)]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]


def _median(times: list[float]) -> float:
    return statistics.median(times[1:])


def _plain(zero: int) -> float:
    out = subprocess.run([*TORCHRUN, str(Path(__file__).with_name("plain_train.py")), "--zero", str(zero),
                          "--steps", str(STEPS), "--hidden", str(HIDDEN)], check=True, capture_output=True,
                         text=True).stdout
    return _median(json.loads(out.strip().splitlines()[-1]))


def _autoplan(zero: int, workdir: Path) -> float:
    plan, metrics = workdir / f"plan{zero}.json", workdir / f"metrics{zero}.jsonl"
    plan.write_text(json.dumps({"dp": 2, "zero_stage": zero, "global_batch_size": 8, "micro_batch_size": 4}))
    metrics.unlink(missing_ok=True)
    model = workdir / "model.py"
    model.write_text("from autoplan.models import build_named\nCONFIG = {'seq_len': 64, 'vocab': 512}\n"
                     f"def build_model():\n    return build_named('gpt-tiny', hidden={HIDDEN}, ffn_hidden={4 * HIDDEN})\n")
    subprocess.run([*TORCHRUN, "-m", "autoplan", "run", str(model), "--plan", str(plan), "--steps", str(STEPS),
                    "--metrics", str(metrics)], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return _median([r["step_time_s"] for r in rows if "step" in r])


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, zero in CASES:
            plain, ours = [], []
            for _ in range(ROUNDS):
                plain.append(_plain(zero))
                ours.append(_autoplan(zero, Path(tmp)))
            p, a = statistics.median(plain), statistics.median(ours)
            rows.append({"case": name, "plain_step_s": p, "autoplan_step_s": a, "overhead": a / p - 1,
                         "plain_rounds": plain, "autoplan_rounds": ours})
            print(f"{name:16s} plain {p * 1e3:8.1f} ms  autoplan {a * 1e3:8.1f} ms  overhead {a / p - 1:+.1%} "
                  f"({'met' if a / p - 1 <= 0.05 else 'MISSED'} target <= +5%)")
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "steps": STEPS, "rounds": ROUNDS,
            "model": f"gpt-tiny with hidden {HIDDEN}", "ranks": 2}
    (RESULTS / "executor_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Executor overhead", "", f"Command: `python -m benchmarks.executor_overhead` ({meta['date']}, "
             f"{meta['cores']} cores, 2 gloo ranks, {meta['model']}, global batch 8, micro-batch 4). Median step "
             f"time after warm-up, median of {ROUNDS} alternating rounds. Target: autoplan within +5%.", "",
             "| case | plain torch (ms) | autoplan (ms) | overhead |", "|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['plain_step_s'] * 1e3:.1f} | {r['autoplan_step_s'] * 1e3:.1f} | "
              f"{r['overhead']:+.1%} |" for r in rows]
    (RESULTS / "executor_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
