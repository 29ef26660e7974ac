"""The `autoplan` command line: its commands, their arguments and help, and the checks of the values given
(autoplan.cli runs the commands)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from autoplan.errors import InvalidInputError
from autoplan.safe_io import read_text

DEFAULT_CLUSTER = "dgx-h100"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        raise InvalidInputError(f"{self.prog}: {message}")


def _stack_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack", help="the software the plan runs on: torch (default: eager PyTorch, autoplan's "
                                        "executor), torch-compile, megatron-te, megatron-2021, llm-foundry, or a "
                                        "stack JSON file (fusion, attention kernel, float8 linears)")
    parser.add_argument("--routing-imbalance", type=float, metavar="X",
                        help="MoE: tokens the busiest expert-parallel rank receives over the mean (default 1.1; "
                             "1.0 is perfectly balanced routing)")


def build_parser(commands: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The argument parser of every command; `commands` maps each command's name to the function that runs it."""
    parser = _Parser(prog="autoplan", description="Find the fastest way to train a PyTorch model on N GPUs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    srch = sub.add_parser("search", help="find the fastest plans that fit",
                          description="Search dp/tp/pp/cp/ep, ZeRO, recompute, micro-batch and pipeline schedule "
                                      "for the fastest plans that fit in GPU memory.")
    _model_args(srch)
    srch.add_argument("--gpus", type=gpus_arg, required=True,
                      help="GPUs in the job, or a range LOW-HIGH (e.g. 8-1024): the best plan at each power of two "
                           "and power-of-two number of nodes in it, with time to train and GPU-hours")
    srch.add_argument("--tokens", default="1T",
                      help="with a --gpus range: tokens to train on, e.g. 1T, 300B, 2.5e12 (default 1T)")
    srch.add_argument("--gpu-hour-price", type=float, metavar="P",
                      help="with a --gpus range: price of one GPU-hour, for a cost column")
    srch.add_argument("--plot", help="with a --gpus range: write the sweep's plot (PNG) here (default: beside --out)")
    srch.add_argument("--cluster", default=DEFAULT_CLUSTER,
                      help=f"preset name or cluster JSON file (default {DEFAULT_CLUSTER})")
    _stack_arg(srch)
    srch.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: 512, or the "
                                                       "next power of two >= GPUs)")
    srch.add_argument("--top", type=int, default=5, help="how many plans to rank (default 5)")
    srch.add_argument("--fix", action="append", default=[], metavar="FIELD=VALUE",
                      help="pin a plan field, e.g. --fix tp=8 --fix zero_stage=1 (repeatable)")
    srch.add_argument("--executable", action="store_true",
                      help="only plans autoplan's executor runs (the default; kept for old scripts)")
    srch.add_argument("--any", action="store_true",
                      help="also plans autoplan's executor does not run (marked not runnable, with the reason)")
    srch.add_argument("--out", help="write the best plan here (a plan file `estimate` and `run` accept)")
    _force_arg(srch)
    srch.add_argument("--json", action="store_true", help="print the SearchResult as JSON")
    srch.add_argument("--verify", action="store_true",
                      help="dry-run the top plans (executor code, fake process group, no GPU) and drop those whose "
                           "measured peak plus the cluster's reserve exceeds GPU memory")
    srch.set_defaults(run=commands["search"])

    est = sub.add_parser("estimate", help="predict step time and memory of one plan",
                         description="Predict step time, throughput, MFU and per-GPU memory of a plan.")
    _model_args(est)
    est.add_argument("--plan", required=True, help="plan JSON file (as written by `autoplan search --out`)")
    est.add_argument("--gpus", type=int, help="GPUs in the job (default: the plan's dp*tp*pp*cp)")
    est.add_argument("--cluster", default=DEFAULT_CLUSTER,
                     help=f"preset name or cluster JSON file (default {DEFAULT_CLUSTER})")
    _stack_arg(est)
    est.add_argument("--json", action="store_true", help="print the Estimate as JSON")
    est.set_defaults(run=commands["estimate"])

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
    dry.set_defaults(run=commands["dryrun"])

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
    run.set_defaults(run=commands["run"])

    launch = sub.add_parser("launch", help="start torchrun on this node and run a plan",
                            description="Start torchrun with --nproc-per-node processes running `autoplan run`.")
    launch.add_argument("--nproc-per-node", type=int, required=True, help="processes (GPUs) on this node")
    launch.add_argument("--nnodes", default="1", help="nodes, passed to torchrun (default 1)")
    launch.add_argument("--rdzv-endpoint", help="rendezvous host:port for several nodes, passed to torchrun")
    launch.add_argument("--max-restarts", type=int, default=0,
                        help="restart every rank this many times if one fails (torchrun's; resume with --checkpoint-dir)")
    launch.add_argument("rest", nargs=argparse.REMAINDER, help="MODEL --plan ... (the arguments of `run`)")
    launch.set_defaults(run=commands["launch"])

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
    bench.set_defaults(run=commands["bench"])

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
    cal.set_defaults(run=commands["calibrate"])

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
    hw.set_defaults(run=commands["profile"])

    prof = sub.add_parser("profile-model", help="trace a model on meta and write its ModelProfile",
                          description="Trace MODEL on the meta device: per-layer FLOPs, parameters, activations.")
    _model_args(prof)
    prof.add_argument("--out", help="write the profile JSON here (default: print a summary)")
    _force_arg(prof)
    prof.set_defaults(run=commands["profile-model"])
    return parser


def _force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace output files that exist (default: refuse)")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to a model.py (defines build_model()), a Hugging Face config.json or "
                                      "model folder, or a built-in name, e.g. llama3-70b")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's CONFIG)")
    parser.add_argument("--trainable", metavar="PATTERN",
                        help="fine-tune: only parameters whose name matches this regular expression train (e.g. "
                             "'layers\\.3[01]\\.|output'); the others are frozen: no gradients, optimizer states "
                             "or data-parallel traffic (default: what the model sets, all for the built-in ones)")


def read_plan(path: str):
    """(Plan, PlanFile or None) of a plan file, or InvalidInputError in one line."""
    from autoplan.schema import parse_plan_file

    return parse_plan_file(read_text(path, "plan file"), source=path)


def check_range(flag: str, value, low, high) -> None:
    """InvalidInputError unless low <= value <= high (None: the option was not given); NaN is out of range."""
    if value is not None and not (low <= value <= high):
        raise InvalidInputError(f"{flag} must be between {low:,} and {high:,}, got {value}")


def default_batch(gpus: int) -> int:
    """The GPU count's odd part times the smallest power of two reaching 512: every GPU count then has
    data-parallel degrees that divide the batch (1000 GPUs -> 1000, 96 -> 768, 64 -> 512)."""
    odd = gpus // (gpus & -gpus)
    batch = odd
    while batch < 512:
        batch *= 2
    return batch


FIXABLE = ("dp", "tp", "pp", "cp", "ep", "etp", "zero_stage", "recompute", "sequence_parallel", "micro_batch_size",
           "schedule", "virtual_stages", "offload")


def fixed_fields(pairs: list[str]) -> dict:
    """{field: value} of --fix FIELD=VALUE pairs, each value checked against the Plan field's type and range."""
    fixed = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in FIXABLE:
            raise InvalidInputError(f"--fix takes FIELD=VALUE with a plan field ({', '.join(FIXABLE)}; "
                                    f"the batch is --global-batch), got {pair!r}")
        fixed[name] = fix_value(name, value)
    return fixed


def fix_value(name: str, text: str):
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


def gpus_arg(text: str) -> int | tuple[int, int]:
    """--gpus of search: N, or LOW-HIGH for a sweep over GPU counts."""
    match = re.fullmatch(r"\s*([0-9]{1,100})\s*(?:-\s*([0-9]{1,100})\s*)?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs or a range such as 8-1024, got {text!r}")
    low = int(match.group(1))
    return low if match.group(2) is None else (low, int(match.group(2)))


def check_job(args) -> int:
    """Check --gpus, --top and --global-batch of search and bench; the global batch to use."""
    from autoplan.planner.search import MAX_TOP_K
    from autoplan.schema import MAX_GLOBAL_BATCH, MAX_GPUS

    gpus = args.gpus if isinstance(args.gpus, tuple) else (args.gpus,)
    for count in gpus:
        check_range("--gpus", count, 1, MAX_GPUS)
    if len(gpus) == 2 and gpus[0] > gpus[1]:
        raise InvalidInputError(f"--gpus range {gpus[0]}-{gpus[1]}: LOW must not exceed HIGH")
    check_range("--top", args.top, 1, MAX_TOP_K)
    check_range("--global-batch", args.global_batch, 1, MAX_GLOBAL_BATCH)
    return args.global_batch if args.global_batch is not None else default_batch(gpus[-1])
