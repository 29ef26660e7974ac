"""The `autoplan` command: a thin layer over the public API (parse, call, print).

Exit codes: 0 done; 2 bad input (one line on stderr, no traceback); 3 no plan fits.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
from pathlib import Path

from autoplan.errors import AutoplanError, InvalidInputError
from autoplan.safe_io import check_output, read_json, read_text

DEFAULT_CLUSTER = "dgx-h100"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        raise InvalidInputError(f"{self.prog}: {message}")


def _stack_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack", help="the software the plan runs on: torch (default: eager PyTorch, autoplan's "
                                        "executor), torch-compile, megatron-te, megatron-2021, llm-foundry, or a "
                                        "stack JSON file (fusion, attention kernel, float8 linears)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoplan", description="Find the fastest way to train a PyTorch model on N GPUs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    srch = sub.add_parser("search", help="find the fastest plans that fit",
                          description="Search dp/tp/pp/cp/ep, ZeRO, recompute, micro-batch and pipeline schedule "
                                      "for the fastest plans that fit in GPU memory.")
    _model_args(srch)
    srch.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    srch.add_argument("--cluster", default=DEFAULT_CLUSTER,
                      help=f"preset name or cluster JSON file (default {DEFAULT_CLUSTER})")
    _stack_arg(srch)
    srch.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: 512, or the "
                                                       "next power of two >= GPUs)")
    srch.add_argument("--top", type=int, default=5, help="how many plans to rank (default 5)")
    srch.add_argument("--fix", action="append", default=[], metavar="FIELD=VALUE",
                      help="pin a plan field, e.g. --fix tp=8 --fix zero_stage=1 (repeatable)")
    srch.add_argument("--executable", action="store_true",
                      help="only plans autoplan's executor runs today (see README: Run a plan)")
    srch.add_argument("--out", help="write the best plan here (a plan file `estimate` and `run` accept)")
    _force_arg(srch)
    srch.add_argument("--json", action="store_true", help="print the SearchResult as JSON")
    srch.add_argument("--verify", action="store_true",
                      help="dry-run the top plans (executor code, fake process group, no GPU) and drop those whose "
                           "measured peak plus the cluster's reserve exceeds GPU memory")
    srch.set_defaults(run=_search)

    est = sub.add_parser("estimate", help="predict step time and memory of one plan",
                         description="Predict step time, throughput, MFU and per-GPU memory of a plan.")
    _model_args(est)
    est.add_argument("--plan", required=True, help="plan JSON file (as written by `autoplan search --out`)")
    est.add_argument("--gpus", type=int, help="GPUs in the job (default: the plan's dp*tp*pp*cp)")
    est.add_argument("--cluster", default=DEFAULT_CLUSTER,
                     help=f"preset name or cluster JSON file (default {DEFAULT_CLUSTER})")
    _stack_arg(est)
    est.add_argument("--json", action="store_true", help="print the Estimate as JSON")
    est.set_defaults(run=_estimate)

    dry = sub.add_parser("dryrun", help="measure a plan's memory per GPU without GPUs",
                         description="Run the plan with the executor's code for the fullest rank of a --gpus job on "
                                     "a fake process group with fake tensors (two training steps) and print its peak "
                                     "memory per GPU by category beside the estimate.")
    _model_args(dry)
    dry.add_argument("--plan", required=True, help="plan JSON file (as written by `autoplan search --out`)")
    dry.add_argument("--gpus", type=int, help="GPUs in the job (default: the plan's dp*tp*pp*cp)")
    dry.add_argument("--cluster", default=DEFAULT_CLUSTER,
                     help=f"preset name or cluster JSON file, for the memory limit and reserve (default {DEFAULT_CLUSTER})")
    dry.add_argument("--stages", choices=("ends", "all"), default="ends",
                     help="pipeline stages to run: the first and the last (default), or all")
    dry.add_argument("--time", action="store_true",
                     help="also record the step's ops and collectives and price them on --cluster: step time and "
                          "its breakdown beside the estimate's")
    dry.add_argument("--json", action="store_true", help="print the DryRunResult as JSON")
    dry.set_defaults(run=_dryrun)

    run = sub.add_parser("run", help="train with a plan (under torchrun)",
                         description="Apply the plan to the model and train on a synthetic stream; run it under "
                                     "torchrun with dp*tp*pp*cp processes (or use `autoplan launch`).")
    _model_args(run)
    run.add_argument("--plan", required=True, help="plan JSON file")
    run.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    run.add_argument("--metrics", help="append one JSON line per step, then a summary, to this file")
    run.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    run.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="bf16 parameters with fp32 master weights in AdamW, or fp32 (default auto: bf16 on "
                          "GPUs, fp32 on CPU)")
    run.add_argument("--track-memory", action="store_true",
                     help="count every tensor byte of the second step (not timed); adds tensor_memory_bytes to the summary")
    run.add_argument("--checkpoint-dir", help="resume from the newest checkpoint here, if any, and save into it")
    run.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                     help="save every K steps (and always after the last step) when --checkpoint-dir is given")
    run.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                     help="keep the newest N complete checkpoints (default 2)")
    run.set_defaults(run=_run)

    launch = sub.add_parser("launch", help="start torchrun on this node and run a plan",
                            description="Start torchrun with --nproc-per-node processes running `autoplan run`.")
    launch.add_argument("--nproc-per-node", type=int, required=True, help="processes (GPUs) on this node")
    launch.add_argument("--nnodes", default="1", help="nodes, passed to torchrun (default 1)")
    launch.add_argument("--rdzv-endpoint", help="rendezvous host:port for several nodes, passed to torchrun")
    launch.add_argument("--max-restarts", type=int, default=0,
                        help="restart every rank this many times if one fails (torchrun's; resume with --checkpoint-dir)")
    launch.add_argument("rest", nargs=argparse.REMAINDER, help="MODEL --plan ... (the arguments of `run`)")
    launch.set_defaults(run=_launch)

    bench = sub.add_parser("bench", help="run candidate plans and compare measured with predicted",
                           description="Run the search's top plans, the expert defaults (and with --every-plan "
                                       "every plan that fits) through the executor for a few steps each; write "
                                       "DIR/report.md, DIR/results.json and plots.")
    _model_args(bench)
    bench.add_argument("--gpus", type=int, required=True, help="ranks to run on (processes on this node)")
    bench.add_argument("--cluster", default=DEFAULT_CLUSTER,
                       help="cluster JSON file measured by `autoplan profile` on this machine, or a preset")
    bench.add_argument("--global-batch", type=int, help="sequences per optimizer step (default as search)")
    bench.add_argument("--top", type=int, default=5, help="top plans of the search to run (default 5)")
    bench.add_argument("--every-plan", action="store_true", help="run every plan of the space that fits")
    bench.add_argument("--sample", type=int, default=0, metavar="N",
                       help="also run N more plans spread evenly over the rest of the predicted ranking")
    bench.add_argument("--fix", action="append", default=[], metavar="FIELD=VALUE", help="pin a plan field")
    bench.add_argument("--steps", type=int, default=8, help="steps per plan (default 8; at least 3)")
    bench.add_argument("--out", required=True, help="directory for report.md, results.json and the plots")
    _force_arg(bench)
    bench.set_defaults(run=_bench)

    cal = sub.add_parser("calibrate", help="fit the cost model's fixed overheads to measured bench runs",
                         description="Fit Cluster.overheads (seconds per loop step, micro-batch, tensor-parallel "
                                     "layer call, FSDP unit, pipeline micro-batch, ...) to the measured step times "
                                     "of `autoplan bench` results; write a cluster file with them.")
    cal.add_argument("results", nargs="+", help="results.json files written by `autoplan bench`")
    cal.add_argument("--cluster", required=True, help="the cluster file the runs were measured on")
    cal.add_argument("--out", required=True, help="cluster file to write")
    cal.add_argument("--model", help="the model the runs trained (a built-in name or model.py): needed when the "
                                     "results name a model file, whose code calibrate imports only when named here")
    _force_arg(cal)
    cal.set_defaults(run=_calibrate)

    hw = sub.add_parser("profile", help="measure this machine (under torchrun for the interconnect) -> cluster.json",
                        description="Measure GEMM throughput, memory bandwidth, attention, collectives and (with "
                                    "MODEL) per-layer times; fit the cost model's parameters; write a Cluster file "
                                    "that search, estimate and bench accept with --cluster.")
    hw.add_argument("model", nargs="?", help="also time this model's blocks (a built-in name or model.py)")
    hw.add_argument("--out", default="cluster.json", help="cluster file to write (default cluster.json)")
    _force_arg(hw)
    hw.add_argument("--quick", action="store_true", help="small sizes, few repeats: seconds instead of minutes")
    hw.add_argument("--name", help="label of the measured cluster")
    hw.add_argument("--peak-flops", type=float, help="declared peak FLOP/s of one device (default: known GPUs' "
                                                     "datasheet value, or the best measured GEMM on CPU)")
    hw.set_defaults(run=_profile_hardware)

    prof = sub.add_parser("profile-model", help="trace a model on meta and write its ModelProfile",
                          description="Trace MODEL on the meta device: per-layer FLOPs, parameters, activations.")
    _model_args(prof)
    prof.add_argument("--out", help="write the profile JSON here (default: print a summary)")
    _force_arg(prof)
    prof.set_defaults(run=_profile_model)
    return parser


def _force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace output files that exist (default: refuse)")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to a model.py (defines build_model()), a Hugging Face config.json or "
                                      "model folder, or a built-in name, e.g. llama3-70b")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's CONFIG)")


def _load_profile(args):
    from autoplan.profiler.model import MAX_SEQ_LEN, profile_model

    _check_range("--seq-len", args.seq_len, 1, MAX_SEQ_LEN)
    profile = profile_model(args.model, seq_len=args.seq_len)
    for note in profile.notes:  # what the profiler could not recognize: said, not silently guessed
        print(f"autoplan: note: {note}", file=sys.stderr)
    return profile


def _estimate(args) -> int:
    from autoplan.costmodel import estimate
    from autoplan.report import estimate_table
    from autoplan.schema import Cluster, Stack

    plan, origin = _read_plan(args.plan)
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


def _read_plan(path: str):
    """(Plan, PlanFile or None) of a plan file, or InvalidInputError in one line."""
    from autoplan.schema import parse_plan_file

    return parse_plan_file(read_text(path, "plan file"), source=path)


def _check_range(flag: str, value, low, high) -> None:
    """InvalidInputError unless low <= value <= high (None: the option was not given); NaN is out of range."""
    if value is not None and not (low <= value <= high):
        raise InvalidInputError(f"{flag} must be between {low:,} and {high:,}, got {value}")


def _warn_if_other_target(path: Path, origin, model: str, seq_len: int, cluster) -> None:
    made = f"{origin.model} (seq_len {origin.seq_len}) on {origin.gpus} x {origin.gpu}"
    used = f"{model} (seq_len {seq_len}) on {cluster.num_gpus} x {cluster.gpu}"
    if made != used:
        print(f"autoplan: warning: {path} was made for {made}, not {used}", file=sys.stderr)


def _default_batch(gpus: int) -> int:
    """The GPU count's odd part times the smallest power of two reaching 512: every GPU count then has
    data-parallel degrees that divide the batch (1000 GPUs -> 1000, 96 -> 768, 64 -> 512)."""
    odd = gpus // (gpus & -gpus)
    batch = odd
    while batch < 512:
        batch *= 2
    return batch


FIXABLE = ("dp", "tp", "pp", "cp", "ep", "zero_stage", "recompute", "sequence_parallel", "micro_batch_size",
           "schedule", "virtual_stages")


def _fixed_fields(pairs: list[str]) -> dict:
    """{field: value} of --fix FIELD=VALUE pairs, each value checked against the Plan field's type and range."""
    fixed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in FIXABLE:
            raise InvalidInputError(f"--fix takes FIELD=VALUE with a plan field ({', '.join(FIXABLE)}; "
                                    f"the batch is --global-batch), got {pair!r}")
        fixed[name] = _fix_value(name, value)
    return fixed


def _fix_value(name: str, text: str):
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    from autoplan.schema import Plan, one_line

    info = Plan.model_fields[name]
    if info.annotation is int:
        if not re.fullmatch(r"[0-9]{1,12}", text):
            raise InvalidInputError(f"--fix {name}={text}: expected a whole number")
        value = int(text)
    elif info.annotation is bool:
        if text.lower() not in ("true", "false"):
            raise InvalidInputError(f"--fix {name}={text}: expected true or false")
        value = text.lower() == "true"
    else:
        value = text
    try:
        return TypeAdapter(Annotated[info.annotation, info]).validate_python(value, strict=True)
    except ValidationError as err:
        raise InvalidInputError(f"--fix {name}={text}: {one_line(err)}") from None


def _check_job(args) -> int:
    """Check --gpus, --top and --global-batch of search and bench; the global batch to use."""
    from autoplan.planner.search import MAX_TOP_K
    from autoplan.schema import MAX_GLOBAL_BATCH, MAX_GPUS

    _check_range("--gpus", args.gpus, 1, MAX_GPUS)
    _check_range("--top", args.top, 1, MAX_TOP_K)
    _check_range("--global-batch", args.global_batch, 1, MAX_GLOBAL_BATCH)
    return args.global_batch if args.global_batch is not None else _default_batch(args.gpus)


def _search(args) -> int:
    from rich.progress import Progress

    from autoplan.planner import search
    from autoplan.report import search_report
    from autoplan.schema import Cluster, PlanFile, Stack

    batch = _check_job(args)
    fixed = _fixed_fields(args.fix)
    if args.out:
        check_output(args.out, force=args.force)
    cluster = Cluster.resolve(args.cluster, gpus=args.gpus)
    profile = _load_profile(args)
    with Progress(transient=True, disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("searching", total=None)
        result = search(profile, cluster, global_batch_size=batch, top_k=args.top, accept=_executable(args, profile),
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

    plan, _ = _read_plan(args.plan)
    if args.gpus is not None and args.gpus != plan.gpus:
        raise InvalidInputError(f"--gpus {args.gpus} but the plan's dp*tp*pp*cp is {plan.gpus}")
    cluster = Cluster.resolve(args.cluster, gpus=plan.gpus)
    profile = _load_profile(args)
    result = dryrun(args.model, plan, gpus=plan.gpus, seq_len=profile.seq_len, stages=args.stages, time=args.time,
                    cluster=cluster)
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

    batch = _check_job(args)
    fixed = _fixed_fields(args.fix)
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
    from autoplan.profiler.calibrate import fit_overheads
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


def _executable(args, profile):
    """With --executable, the predicate that keeps the search to plans the executor runs."""
    if not args.executable:
        return None
    from autoplan.models.hf import is_hf_spec
    from autoplan.support import unsupported_reason

    moe = profile.num_experts > 0
    foreign = is_hf_spec(args.model)
    return lambda plan: unsupported_reason(plan, moe=moe, foreign=foreign) is None


def _run(args) -> int:
    import torch.distributed as dist

    from autoplan.executor import init_distributed
    from autoplan.executor.launch import die_with_parent

    die_with_parent()  # under torchrun: a killed launcher (or torchrun) takes this rank with it
    if args.steps < 1:
        raise InvalidInputError(f"--steps must be positive, got {args.steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InvalidInputError(f"--lr must be a positive, finite number, got {args.lr}")
    _check_range("--seed", args.seed, 0, 2**63 - 1)
    if args.checkpoint_every < 0 or args.keep_checkpoints < 1:
        raise InvalidInputError("--checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise InvalidInputError("--checkpoint-every needs --checkpoint-dir")
    if args.checkpoint_dir and Path(args.checkpoint_dir).exists() and not Path(args.checkpoint_dir).is_dir():
        raise InvalidInputError(f"--checkpoint-dir {args.checkpoint_dir} exists and is not a directory")
    if args.metrics and (Path(args.metrics).is_symlink() or not Path(args.metrics).parent.is_dir()):
        raise InvalidInputError(f"--metrics {args.metrics}: a symbolic link, or its folder does not exist")
    plan, _ = _read_plan(args.plan)
    device = init_distributed()
    error = None
    try:
        _train_plan(args, plan, device)
    except BaseException as err:  # noqa: BLE001  raised again below, once the process group is gone
        error = err if os.environ.get("AUTOPLAN_DEBUG") else _without_frames(err)
    # the data-parallel wrappers go before their process group, on success and on error alike (the error's
    # frames held them): torch's composable DDP, destroyed after it at exit, aborted the process now and then
    # ("terminate called without an active exception"), which a launcher saw as SIGABRT instead of exit 2
    gc.collect()
    if dist.is_initialized():
        if error is None:
            dist.barrier()  # every rank done with its last collective before any tears the group down (FSDP2)
        dist.destroy_process_group()
    if error is not None:
        raise error
    return 0


def _train_plan(args, plan, device) -> None:
    """Build the model, apply the plan and train: the body of `autoplan run`."""
    import torch

    from autoplan.executor import apply, train
    from autoplan.models.loader import load_model

    torch.manual_seed(args.seed)
    overrides = {"seq_len": args.seq_len} if args.seq_len else {}
    loaded = load_model(args.model, device=device, **({} if args.model.endswith(".py") else overrides))
    model = loaded.module
    if hasattr(model, "init_weights"):
        model.init_weights(seed=args.seed)
    if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"):
        model.to(torch.bfloat16)  # AdamW then keeps fp32 master weights (executor.precision)
    seq_len = args.seq_len or loaded.seq_len
    vocab = loaded.config.get("vocab") or getattr(getattr(model, "config", None), "vocab", None)
    if not seq_len or not vocab:
        raise InvalidInputError(f"{args.model}: set CONFIG['seq_len'] and CONFIG['vocab'] in the model file")
    par = apply(model, plan, device_type=device.type, tp_plan=loaded.tp_plan)
    train(par, steps=args.steps, seq_len=seq_len, vocab=vocab, device=device, lr=args.lr, seed=args.seed,
          metrics_path=args.metrics, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
          keep_checkpoints=args.keep_checkpoints, model_name=_model_name(args.model, seq_len),
          track_memory=args.track_memory)


def _without_frames(err: BaseException) -> BaseException:
    """`err` with its traceback (and those of the errors it was raised from) dropped: their frames hold the
    model and its wrappers alive."""
    link, seen = err, set()
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__context__
    return err


def _model_name(model: str, seq_len: int) -> str:
    """What a checkpoint records of the model: the built-in name, or the model file's resolved path."""
    name = str(Path(model).resolve()) if model.endswith(".py") else model
    return f"{name} seq_len={seq_len}"


def _launch(args) -> int:
    from autoplan.executor.launch import launch

    _check_range("--nproc-per-node", args.nproc_per_node, 1, 4096)
    _check_range("--max-restarts", args.max_restarts, 0, 1000)
    rest = [a for a in args.rest if a != "--"]
    if not rest:
        raise InvalidInputError("autoplan launch: give the model and the run arguments, e.g. gpt-tiny --plan plan.json")
    return launch(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
                  max_restarts=args.max_restarts, run_args=rest)


def _profile_hardware(args) -> int:
    from autoplan.profiler.calibrate import run_profile, summary

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
