"""`autoplan run` and `autoplan launch`: train with a plan, under torchrun or started by autoplan on this node."""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

from autoplan.cli_parser import check_range, read_plan
from autoplan.errors import InvalidInputError


def _run(args) -> int:
    import torch.distributed as dist

    from autoplan.executor import init_distributed
    from autoplan.executor.launch import die_with_parent

    die_with_parent()  # under torchrun: a killed launcher (or torchrun) takes this rank with it
    if args.steps < 1:
        raise InvalidInputError(f"--steps must be positive, got {args.steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InvalidInputError(f"--lr must be a positive, finite number, got {args.lr}")
    check_range("--seed", args.seed, 0, 2**63 - 1)
    if args.checkpoint_every < 0 or args.keep_checkpoints < 1:
        raise InvalidInputError("--checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise InvalidInputError("--checkpoint-every needs --checkpoint-dir")
    if args.checkpoint_dir and Path(args.checkpoint_dir).exists() and not Path(args.checkpoint_dir).is_dir():
        raise InvalidInputError(f"--checkpoint-dir {args.checkpoint_dir} exists and is not a directory")
    if args.metrics and (Path(args.metrics).is_symlink() or not Path(args.metrics).parent.is_dir()):
        raise InvalidInputError(f"--metrics {args.metrics}: a symbolic link, or its folder does not exist")
    plan, _ = read_plan(args.plan)
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
    from autoplan.models.finetune import apply_trainable

    apply_trainable(model, args.trainable)
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

    check_range("--nproc-per-node", args.nproc_per_node, 1, 4096)
    check_range("--max-restarts", args.max_restarts, 0, 1000)
    rest = [a for a in args.rest if a != "--"]
    if not rest:
        raise InvalidInputError("autoplan launch: give the model and the run arguments, e.g. gpt-tiny --plan plan.json")
    return launch(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
                  max_restarts=args.max_restarts, run_args=rest)
