"""A plain hand-written torch training script (no autoplan executor) for the overhead benchmark:
DDP (--zero 0) or FSDP2 fully_shard (--zero 3) over all ranks, AdamW, the same model and batch shapes.
Run under torchrun; rank 0 prints the per-step times as JSON."""

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from autoplan.executor.data import global_batch
from autoplan.models import build_named


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--zero", type=int, choices=(0, 3), default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--hidden", type=int)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    overrides = {"hidden": args.hidden, "ffn_hidden": 4 * args.hidden} if args.hidden else {}
    model = build_named(args.model, **overrides)
    model.init_weights(seed=0)
    seq_len, vocab = model.config.seq_len, model.config.vocab
    if args.zero == 0:
        model = DistributedDataParallel(model)
    else:
        for block in model.layers.values():
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        batch = global_batch(step=step, global_batch_size=args.global_batch, seq_len=seq_len, vocab=vocab)
        share = args.global_batch // world
        micro = batch[rank * share:(rank + 1) * share].split(args.micro_batch)
        for tokens in micro:
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) / len(micro)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    if rank == 0:
        print(json.dumps(times))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
