"""The `autoplan` command: a thin layer over the public API (parse, call, print).

Exit codes: 0 done; 2 bad input (one line on stderr, no traceback); 3 no plan fits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from autoplan.cli_parser import build_parser, check_job, check_range, fixed_fields, read_plan
from autoplan.cli_run import _launch, _run
from autoplan.errors import AutoplanError, InvalidInputError
from autoplan.safe_io import check_output, read_json

COMMANDS = {}  # command name -> the function that runs it (filled in below the functions)


def _parser() -> argparse.ArgumentParser:
    return build_parser(COMMANDS)


def _load_profile(args):
    from autoplan.profiler.model import MAX_SEQ_LEN, profile_model

    check_range("--seq-len", args.seq_len, 1, MAX_SEQ_LEN)
    profile = profile_model(args.model, seq_len=args.seq_len, trainable=args.trainable)
    imbalance = getattr(args, "routing_imbalance", None)
    if imbalance is not None:
        check_range("--routing-imbalance", imbalance, 1.0, 1024.0)
        profile = profile.model_copy(update={"routing_imbalance": float(imbalance)})
    for note in profile.notes:  # what the profiler could not recognize: said, not silently guessed
        print(f"autoplan: note: {note}", file=sys.stderr)
    return profile


def _estimate(args) -> int:
    from autoplan.costmodel import estimate
    from autoplan.report import estimate_table
    from autoplan.schema import Cluster, Stack

    plan, origin = read_plan(args.plan)
    cluster = Cluster.resolve(args.cluster, gpus=args.gpus if args.gpus is not None else plan.gpus)
    profile = _load_profile(args)
    if origin is not None:
        _warn_if_other_target(Path(args.plan), origin, args.model, profile.seq_len, cluster)
    result = estimate(profile, cluster, plan, stack=Stack.resolve(args.stack))
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(estimate_table(result, plan=plan, cluster=cluster, profile=profile), end="")
    return 0


def _warn_if_other_target(path: Path, origin, model: str, seq_len: int, cluster) -> None:
    made = f"{origin.model} (seq_len {origin.seq_len}) on {origin.gpus} x {origin.gpu}"
    used = f"{model} (seq_len {seq_len}) on {cluster.num_gpus} x {cluster.gpu}"
    if made != used:
        print(f"autoplan: warning: {path} was made for {made}, not {used}", file=sys.stderr)


def _search(args) -> int:
    from rich.progress import Progress

    from autoplan.planner import search
    from autoplan.report import search_report
    from autoplan.schema import Cluster, PlanFile, Stack

    batch = check_job(args)
    fixed = fixed_fields(args.fix)
    if isinstance(args.gpus, tuple):  # a range: the best plan per GPU count
        from autoplan.cli_sweep import run_sweep

        profile = _load_profile(args)
        return run_sweep(args, batch=batch, fixed=fixed, profile=profile, foreign=_foreign(args.model))
    if args.out:
        check_output(args.out, force=args.force)
    cluster = Cluster.resolve(args.cluster, gpus=args.gpus)
    profile = _load_profile(args)
    with Progress(transient=True, disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("searching", total=None)
        result = search(profile, cluster, global_batch_size=batch, top_k=args.top, runnable_only=not args.any,
                        foreign=_foreign(args.model),
                        stack=Stack.resolve(args.stack),
                        progress=lambda done, total: bar.update(task, completed=done, total=total), **fixed)
    verification = _verify(args, result, cluster, profile.seq_len) if args.verify else None
    if verification is not None:
        result, lines = verification
    if args.out:
        command = "autoplan " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("autoplan") else None
        PlanFile(plan=result.best, model=args.model, seq_len=profile.seq_len, cluster=args.cluster, gpu=cluster.gpu,
                 gpus=cluster.num_gpus, estimate=result.best_estimate, command=command).save(args.out, force=args.force)
    if args.json:
        data = result.to_dict()
        if verification is not None:
            data["verification"] = lines
        print(json.dumps(data, indent=2))
    else:
        if verification is not None:
            print("\n".join(lines))
        print(search_report(result, profile=profile, cluster=cluster), end="")
        if args.out:
            print(f"wrote the best plan to {args.out}")
    return 0


def _verify(args, result, cluster, seq_len: int):
    """`search --verify`: dry-run the ranked plans, keep those that fit; (the result with them, report lines)."""
    from dataclasses import replace

    from autoplan import verify_plans
    from autoplan.errors import InfeasiblePlanError

    kept, dropped = verify_plans(result.ranked, args.model, cluster, seq_len=seq_len)
    gib, reserve = 2**30, cluster.memory_reserve_bytes
    lines = [f"verified {len(result.ranked)} plans by dry run ({len(dropped)} dropped: over "
             f"{cluster.memory_bytes / gib:.1f} GiB with the {reserve / gib:.1f} GiB reserve, or not run by the executor):"]
    for plan, est, dry in kept + dropped:
        if isinstance(dry, str):
            lines.append(f"  REFUSED {plan.describe()}: {dry}")
            continue
        verdict = "fits" if dry.fits(cluster) else "DROPPED"
        lines.append(f"  {verdict:7s} {plan.describe()}: estimated {est.memory_per_gpu_bytes / gib:.1f} GiB, "
                     f"measured {(dry.peak_memory_bytes + reserve) / gib:.1f} GiB")
    if not kept:
        measured = [item for item in dropped if not isinstance(item[2], str)]
        if not measured:
            raise InfeasiblePlanError(f"none of the {len(dropped)} ranked plans runs on the executor: {dropped[0][2]}")
        plan, _, dry = min(measured, key=lambda item: item[2].peak_memory_bytes)
        over = dry.peak_memory_bytes + reserve - cluster.memory_bytes
        raise InfeasiblePlanError(f"no verified plan fits in {cluster.memory_bytes / gib:.1f} GiB per GPU; closest: "
                                  f"{plan.describe()} measures {(dry.peak_memory_bytes + reserve) / gib:.1f} GiB "
                                  f"({over:,} bytes over)")
    return replace(result, ranked=[(plan, est) for plan, est, _ in kept]), lines


def _dryrun(args) -> int:
    from autoplan import dryrun
    from autoplan.costmodel import estimate
    from autoplan.costmodel.estimate import Coster
    from autoplan.costmodel.rank_memory import rank_peak
    from autoplan.report.dryrun import dryrun_table
    from autoplan.schema import Cluster

    plan, _ = read_plan(args.plan)
    if args.gpus is not None and args.gpus != plan.gpus:
        raise InvalidInputError(f"--gpus {args.gpus} but the plan's dp*tp*pp*cp is {plan.gpus}")
    cluster = Cluster.resolve(args.cluster, gpus=plan.gpus)
    profile = _load_profile(args)
    result = dryrun(args.model, plan, gpus=plan.gpus, seq_len=profile.seq_len, stages=args.stages, time=args.time,
                    cluster=cluster, trainable=args.trainable)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    est = estimate(profile, cluster, plan)
    ranks = Coster.of(profile, cluster).rank_costs(plan)
    per_stage = {s.stage: rank_peak(ranks[s.stage].memory, plan, s.stage, physical=True)[0] for s in result.stages}
    print(dryrun_table(result, cluster=cluster, estimate=est, estimate_per_stage=per_stage), end="")
    return 0


def _bench(args) -> int:
    from autoplan.profiler.model import profile_model
    from autoplan.report.bench import bench
    from autoplan.schema import Cluster

    if args.trainable is not None:
        raise InvalidInputError("bench runs whole models; --trainable is taken by search, estimate, dryrun and run")
    batch = check_job(args)
    fixed = fixed_fields(args.fix)
    out = Path(args.out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InvalidInputError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidInputError(f"cannot create --out {out}: {err.strerror or err}") from None
    for name in ("results.json", "report.md"):
        check_output(out / name, force=args.force)
    cluster = Cluster.resolve(args.cluster, gpus=args.gpus)
    dtype = _profile_dtype(cluster)
    profile = profile_model(args.model, seq_len=args.seq_len, dtype=dtype)
    command = "autoplan " + " ".join(sys.argv[1:])
    results = bench(args.model, profile, cluster, out=out, global_batch_size=batch, top_k=args.top,
                    steps=args.steps, every_plan=args.every_plan, sample=args.sample, seq_len=args.seq_len,
                    command=command,
                    progress=lambda line: print(line, file=sys.stderr, flush=True), **fixed)
    acc = results["accuracy"]
    print(f"{acc['measured']} of {acc['plans']} plans ran; report in {out / 'report.md'}")
    for key in ("step_time_mape", "memory_mape", "spearman", "regret"):
        if acc.get(key) is not None:
            print(f"  {key:15s} {acc[key]:.3f}")
    return 0


def _calibrate(args) -> int:
    from autoplan.profiler.overheads import fit_overheads
    from autoplan.profiler.model import profile_model
    from autoplan.schema import Cluster, Plan

    from pydantic import ValidationError

    from autoplan.schema import one_line

    cluster = Cluster.resolve(args.cluster)
    check_output(args.out, force=args.force)
    runs = []
    for path in args.results:
        results = read_json(path, "bench results file")
        try:
            rows = [(row["plan"], row["measured_step_time_s"]) for row in results["plans"] if row["status"] == "ok"]
            model, seq_len = results["model"], results["seq_len"]
            plans = [Plan.model_validate(plan) for plan, _ in rows]
        except ValidationError as err:
            raise InvalidInputError(f"{path}: a plan is invalid: {one_line(err)}") from None
        except (KeyError, TypeError, AttributeError) as err:
            raise InvalidInputError(f"{path}: not a bench results file ({type(err).__name__}: {err})") from None
        profile = profile_model(_calibrated_model(path, model, args.model), seq_len=seq_len,
                                dtype=_profile_dtype(cluster))
        runs += [(profile, plan, seconds) for plan, (_, seconds) in zip(plans, rows)]
    fit = fit_overheads(cluster, runs)
    fit.cluster.save(args.out, force=args.force)
    print(f"fitted {len(fit.cluster.overheads)} overheads to {fit.runs} runs: step-time MAPE "
          f"{fit.mape_before * 100:.1f}% -> {fit.mape_after * 100:.1f}% (in sample)")
    for name, seconds in fit.cluster.overheads.items():
        print(f"  {name:24s} {seconds * 1e6:10.1f} us")
    if fit.unseen:
        print(f"  not exercised by the runs (0): {', '.join(fit.unseen)}")
    print(f"wrote {args.out}")
    return 0


def _calibrated_model(path: str, recorded, given: str | None) -> str:
    """The model calibrate profiles for a results file: the one named on the command line (--model), else
    the file's own only if it is a built-in name. A results file is data: the model file it names is not
    imported unless the user names that file too."""
    from autoplan.models.configs import NAMED_CONFIGS

    if given is not None:
        return given
    if isinstance(recorded, str) and recorded in NAMED_CONFIGS:
        return recorded
    raise InvalidInputError(f"{path} names the model {recorded!r}, not a built-in one; calibrate imports model code "
                            f"only when it is named on the command line: add --model {recorded}")


def _profile_dtype(cluster):
    """The dtype the executor trains in on the cluster's devices: what a profile run measured (fp32 on CPU),
    else bf16 (the presets' GPUs)."""
    import torch

    measured = (cluster.measurements or {}).get("dtype")
    return getattr(torch, measured) if measured in ("float32", "bfloat16", "float16") else torch.bfloat16


def _foreign(model: str) -> bool:
    """A Hugging Face model (laid out by autoplan.models.hf; the executor refuses more of its plans)."""
    from autoplan.models.hf import is_hf_spec

    return is_hf_spec(model)


def _profile_hardware(args) -> int:
    from autoplan.profiler.session import run_profile, summary

    if args.peak_flops is not None and not (math.isfinite(args.peak_flops) and args.peak_flops > 0):
        raise InvalidInputError(f"--peak-flops must be a positive, finite number, got {args.peak_flops}")
    if os.environ.get("RANK", "0") == "0":
        check_output(args.out, force=args.force)
    cluster = run_profile(out=args.out, quick=args.quick, model=args.model, name=args.name,
                          peak_flops_per_s=args.peak_flops, show_progress=sys.stderr.isatty())
    if os.environ.get("RANK", "0") == "0":
        print(summary(cluster))
        print(f"wrote {args.out}")
    return 0


def _profile_model(args) -> int:
    from autoplan.report.tables import count

    if args.out:
        check_output(args.out, force=args.force)
    profile = _load_profile(args)
    if args.out:
        profile.save(args.out, force=args.force)
        print(f"wrote {args.out}: {len(profile.layers)} layers, {count(profile.total_params)} params")
    else:
        print(f"{profile.name}: {count(profile.total_params)} params, {profile.num_blocks} blocks, "
              f"{profile.train_flops_per_sequence / 1e12:.2f} TFLOP per sequence of {profile.seq_len} tokens")
        for layer in profile.layers:
            print(f"  {layer.name:32s} {layer.kind:9s} {layer.params / 1e6:10.2f}M params "
                  f"{layer.fwd_flops / 1e9:12.2f} GFLOP fwd {layer.activation_bytes / 2**20:10.1f} MiB saved")
    return 0


COMMANDS.update({"search": _search, "estimate": _estimate, "dryrun": _dryrun, "run": _run, "launch": _launch,
                 "bench": _bench, "calibrate": _calibrate, "profile": _profile_hardware,
                 "profile-model": _profile_model})


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return args.run(args)
    except AutoplanError as err:
        return _fail(f"autoplan: error: {err}", err.exit_code)
    except KeyboardInterrupt:
        return _fail("autoplan: interrupted", 130)
    except Exception as err:  # a bug in autoplan: one line unless asked for the traceback
        if os.environ.get("AUTOPLAN_DEBUG"):
            raise
        line = " ".join(f"autoplan: internal error: {type(err).__name__}: {err}".split())
        return _fail(f"{line} (set AUTOPLAN_DEBUG=1 for the traceback)", 1)


def _fail(line: str, code: int) -> int:
    """Print the one line (a rank under `autoplan launch` hands it to the launcher instead); the exit code."""
    from autoplan.executor.launch import report_rank_error

    if not report_rank_error(line):
        print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
