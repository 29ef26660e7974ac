"""`autoplan search MODEL --gpus LOW-HIGH`: the sweep over GPU counts (a thin layer over ap.sweep)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from autoplan.errors import InvalidInputError
from autoplan.safe_io import check_output, write_text


def run_sweep(args, *, batch: int, fixed: dict, profile, foreign: bool = False) -> int:
    """Search each GPU count of the --gpus range, print the table (or JSON), write --out and the plot."""
    from rich.progress import Progress

    from autoplan.planner.sweep import parse_tokens, sweep
    from autoplan.report.sweep import sweep_plot, sweep_table
    from autoplan.schema import Cluster, Stack

    if args.verify:
        raise InvalidInputError("--verify takes one GPU count, not a --gpus range")
    tokens = parse_tokens(args.tokens)
    if args.gpu_hour_price is not None and not (math.isfinite(args.gpu_hour_price) and args.gpu_hour_price >= 0):
        raise InvalidInputError(f"--gpu-hour-price must be a non-negative, finite number, got {args.gpu_hour_price}")
    plot = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png") if args.out else None
    for path in (args.out, plot):
        if path:
            check_output(path, force=args.force)
    cluster = Cluster.resolve(args.cluster)
    with Progress(transient=True, disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("GPU counts", total=None)
        result = sweep(profile, cluster, gpus=args.gpus, global_batch_size=batch, tokens=tokens,
                       gpu_hour_price=args.gpu_hour_price, stack=Stack.resolve(args.stack),
                       runnable_only=not args.any, foreign=foreign,
                       progress=lambda done, total: bar.update(task, completed=done, total=total), **fixed)
    data = result.to_dict()
    if args.out:
        write_text(args.out, json.dumps(data, indent=2) + "\n", force=args.force)
    if plot:
        sweep_plot(result, plot, force=args.force)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(sweep_table(result), end="")
    if args.out:
        print(f"wrote the sweep to {args.out}")
    print(f"wrote the plot to {plot}" if plot else "give --plot FILE.png (or --out) for the plot")
    return 0
