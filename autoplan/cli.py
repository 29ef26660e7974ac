"""The `autoplan` command: a thin layer over the public API (parse, call, print).

Exit codes: 0 done; 2 bad input (one line on stderr, no traceback); 3 no plan fits.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

from autoplan.errors import AutoplanError, InvalidInputError

DEFAULT_CLUSTER = "dgx-h100"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        raise InvalidInputError(f"{self.prog}: {message}")


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
    srch.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: 512, or the "
                                                       "next power of two >= GPUs)")
    srch.add_argument("--top", type=int, default=5, help="how many plans to rank (default 5)")
    srch.add_argument("--fix", action="append", default=[], metavar="FIELD=VALUE",
                      help="pin a plan field, e.g. --fix tp=8 --fix zero_stage=1 (repeatable)")
    srch.add_argument("--executable", action="store_true",
                      help="only plans autoplan's executor runs today (see README: Run a plan)")
    srch.add_argument("--out", help="write the best plan here (a plan file `estimate` and `run` accept)")
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
    bench.set_defaults(run=_bench)

    cal = sub.add_parser("calibrate", help="fit the cost model's fixed overheads to measured bench runs",
                         description="Fit Cluster.overheads (seconds per loop step, micro-batch, tensor-parallel "
                                     "layer call, FSDP unit, pipeline micro-batch, ...) to the measured step times "
                                     "of `autoplan bench` results; write a cluster file with them.")
    cal.add_argument("results", nargs="+", help="results.json files written by `autoplan bench`")
    cal.add_argument("--cluster", required=True, help="the cluster file the runs were measured on")
    cal.add_argument("--out", required=True, help="cluster file to write")
    cal.set_defaults(run=_calibrate)

    hw = sub.add_parser("profile", help="measure this machine (under torchrun for the interconnect) -> cluster.json",
                        description="Measure GEMM throughput, memory bandwidth, attention, collectives and (with "
                                    "MODEL) per-layer times; fit the cost model's parameters; write a Cluster file "
                                    "that search, estimate and bench accept with --cluster.")
    hw.add_argument("model", nargs="?", help="also time this model's blocks (a built-in name or model.py)")
    hw.add_argument("--out", default="cluster.json", help="cluster file to write (default cluster.json)")
    hw.add_argument("--quick", action="store_true", help="small sizes, few repeats: seconds instead of minutes")
    hw.add_argument("--name", help="label of the measured cluster")
    hw.add_argument("--peak-flops", type=float, help="declared peak FLOP/s of one device (default: known GPUs' "
                                                     "datasheet value, or the best measured GEMM on CPU)")
    hw.set_defaults(run=_profile_hardware)

    prof = sub.add_parser("profile-model", help="trace a model on meta and write its ModelProfile",
                          description="Trace MODEL on the meta device: per-layer FLOPs, parameters, activations.")
    _model_args(prof)
    prof.add_argument("--out", help="write the profile JSON here (default: print a summary)")
    prof.set_defaults(run=_profile_model)
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to a model.py (defines build_model()) or a built-in name, e.g. llama3-70b")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's CONFIG)")


def _load_profile(args):
    from autoplan.profiler.model import profile_model

    if args.seq_len is not None and args.seq_len < 1:
        raise InvalidInputError(f"--seq-len must be positive, got {args.seq_len}")
    return profile_model(args.model, seq_len=args.seq_len)


def _estimate(args) -> int:
    from autoplan.costmodel import estimate
    from autoplan.report import estimate_table
    from autoplan.schema import Cluster, parse_plan_file

    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise InvalidInputError(f"plan file not found: {plan_path}")
    plan, origin = parse_plan_file(plan_path.read_text(), source=str(plan_path))
    cluster = Cluster.resolve(args.cluster, gpus=args.gpus if args.gpus is not None else plan.gpus)
    profile = _load_profile(args)
    if origin is not None:
        _warn_if_other_target(plan_path, origin, args.model, profile.seq_len, cluster)
    result = estimate(profile, cluster, plan)
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


def _default_batch(gpus: int) -> int:
    """The GPU count's odd part times the smallest power of two reaching 512: every GPU count then has
    data-parallel degrees that divide the batch (1000 GPUs -> 1000, 96 -> 768, 64 -> 512)."""
    odd = gpus // (gpus & -gpus)
    batch = odd
    while batch < 512:
        batch *= 2
    return batch


def _fixed_fields(pairs: list[str]) -> dict:
    from autoplan.schema import Plan

    fixed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in Plan.model_fields or name in ("layers_per_stage", "recompute_per_stage"):
            raise InvalidInputError(f"--fix takes FIELD=VALUE with a plan field (dp, tp, pp, cp, ep, zero_stage, "
                                    f"recompute, micro_batch_size, schedule, virtual_stages), got {pair!r}")
        fixed[name] = int(value) if value.isdigit() else value
    return fixed


def _search(args) -> int:
    from rich.progress import Progress

    from autoplan.planner import search
    from autoplan.report import search_report
    from autoplan.schema import Cluster, PlanFile

    if args.gpus < 1 or args.top < 1:
        raise InvalidInputError(f"--gpus and --top must be positive, got {args.gpus} and {args.top}")
    fixed = _fixed_fields(args.fix)
    cluster = Cluster.resolve(args.cluster, gpus=args.gpus)
    profile = _load_profile(args)
    batch = args.global_batch or _default_batch(args.gpus)
    if batch < 1:
        raise InvalidInputError(f"--global-batch must be positive, got {batch}")
    with Progress(transient=True, disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("searching", total=None)
        result = search(profile, cluster, global_batch_size=batch, top_k=args.top, accept=_executable(args, profile),
                        progress=lambda done, total: bar.update(task, completed=done, total=total), **fixed)
    verification = _verify(args, result, cluster, profile.seq_len) if args.verify else None
    if verification is not None:
        result, lines = verification
    if args.out:
        command = "autoplan " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("autoplan") else None
        PlanFile(plan=result.best, model=args.model, seq_len=profile.seq_len, cluster=args.cluster, gpu=cluster.gpu,
                 gpus=cluster.num_gpus, estimate=result.best_estimate, command=command).save(args.out)
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
    from autoplan.schema import Cluster, parse_plan_file

    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise InvalidInputError(f"plan file not found: {plan_path}")
    plan, _ = parse_plan_file(plan_path.read_text(), source=str(plan_path))
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

    if args.gpus < 1 or args.top < 1:
        raise InvalidInputError(f"--gpus and --top must be positive, got {args.gpus} and {args.top}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a directory")
    cluster = Cluster.resolve(args.cluster, gpus=args.gpus)
    dtype = _profile_dtype(cluster)
    profile = profile_model(args.model, seq_len=args.seq_len, dtype=dtype)
    batch = args.global_batch or _default_batch(args.gpus)
    command = "autoplan " + " ".join(sys.argv[1:])
    results = bench(args.model, profile, cluster, out=out, global_batch_size=batch, top_k=args.top,
                    steps=args.steps, every_plan=args.every_plan, sample=args.sample, seq_len=args.seq_len,
                    command=command,
                    progress=lambda line: print(line, file=sys.stderr, flush=True), **_fixed_fields(args.fix))
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

    cluster = Cluster.resolve(args.cluster)
    runs = []
    for path in map(Path, args.results):
        try:
            results = json.loads(path.read_text())
            rows = [(row["plan"], row["measured_step_time_s"]) for row in results["plans"] if row["status"] == "ok"]
            model, seq_len = results["model"], results["seq_len"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InvalidInputError(f"{path}: not a bench results file ({type(err).__name__}: {err})") from None
        profile = profile_model(model, seq_len=seq_len, dtype=_profile_dtype(cluster))
        runs += [(profile, Plan.model_validate(plan), seconds) for plan, seconds in rows]
    fit = fit_overheads(cluster, runs)
    fit.cluster.save(args.out)
    print(f"fitted {len(fit.cluster.overheads)} overheads to {fit.runs} runs: step-time MAPE "
          f"{fit.mape_before * 100:.1f}% -> {fit.mape_after * 100:.1f}% (in sample)")
    for name, seconds in fit.cluster.overheads.items():
        print(f"  {name:24s} {seconds * 1e6:10.1f} us")
    if fit.unseen:
        print(f"  not exercised by the runs (0): {', '.join(fit.unseen)}")
    print(f"wrote {args.out}")
    return 0


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
    from autoplan.support import unsupported_reason

    moe = profile.num_experts > 0
    return lambda plan: unsupported_reason(plan, moe=moe) is None


def _run(args) -> int:
    import torch.distributed as dist

    from autoplan.executor import apply, init_distributed, train
    from autoplan.models.loader import load_model
    from autoplan.schema import parse_plan_file

    if args.steps < 1:
        raise InvalidInputError(f"--steps must be positive, got {args.steps}")
    if args.checkpoint_every < 0 or args.keep_checkpoints < 1:
        raise InvalidInputError("--checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise InvalidInputError("--checkpoint-every needs --checkpoint-dir")
    if args.checkpoint_dir and Path(args.checkpoint_dir).exists() and not Path(args.checkpoint_dir).is_dir():
        raise InvalidInputError(f"--checkpoint-dir {args.checkpoint_dir} exists and is not a directory")
    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise InvalidInputError(f"plan file not found: {plan_path}")
    plan, _ = parse_plan_file(plan_path.read_text(), source=str(plan_path))
    device = init_distributed()
    try:
        import torch

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
        # the data-parallel wrappers go before their process group: torch's composable DDP, destroyed after it
        # at exit, aborted the process now and then ("terminate called without an active exception")
        del par, model, loaded
        gc.collect()
        if dist.is_initialized():
            dist.barrier()  # every rank done with its last collective before any tears the group down (FSDP2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _model_name(model: str, seq_len: int) -> str:
    """What a checkpoint records of the model: the built-in name, or the model file's resolved path."""
    name = str(Path(model).resolve()) if model.endswith(".py") else model
    return f"{name} seq_len={seq_len}"


def _launch(args) -> int:
    import subprocess

    if args.nproc_per_node < 1:
        raise InvalidInputError(f"--nproc-per-node must be positive, got {args.nproc_per_node}")
    rest = [a for a in args.rest if a != "--"]
    if not rest:
        raise InvalidInputError("autoplan launch: give the model and the run arguments, e.g. gpt-tiny --plan plan.json")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
               f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    if args.rdzv_endpoint:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}"]
    elif str(args.nnodes) == "1":  # a free port on this machine: several jobs (or test workers) side by side
        command += ["--standalone"]
    command += ["-m", "autoplan", "run", *rest]
    return subprocess.call(command)


def _profile_hardware(args) -> int:
    from autoplan.profiler.calibrate import run_profile, summary

    cluster = run_profile(out=args.out, quick=args.quick, model=args.model, name=args.name,
                          peak_flops_per_s=args.peak_flops, show_progress=sys.stderr.isatty())
    if os.environ.get("RANK", "0") == "0":
        print(summary(cluster))
        print(f"wrote {args.out}")
    return 0


def _profile_model(args) -> int:
    from autoplan.report.tables import count

    profile = _load_profile(args)
    if args.out:
        profile.save(args.out)
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
        print(f"autoplan: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("autoplan: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in autoplan: one line unless asked for the traceback
        if os.environ.get("AUTOPLAN_DEBUG"):
            raise
        print(f"autoplan: internal error: {type(err).__name__}: {err} (set AUTOPLAN_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
