"""A deterministic synthetic token stream: the same global batch for a step on any number of ranks."""

from __future__ import annotations

import torch


NOISE = 0.1  # fraction of tokens drawn at random instead of from the bigram rule


def global_batch(*, step: int, global_batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Tokens [global_batch_size, seq_len + 1] of step `step` (inputs are [:, :-1], targets [:, 1:]).

    A learnable stream: each token follows from the previous one by t' = (7·t + 3) mod vocab, except a
    NOISE fraction drawn at random, so a model's loss falls from ln(vocab) towards the noise's entropy."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    tokens = torch.empty(global_batch_size, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (global_batch_size,), generator=generator)
    noise = torch.rand(global_batch_size, seq_len + 1, generator=generator) < NOISE
    random = torch.randint(0, vocab, (global_batch_size, seq_len + 1), generator=generator)
    for i in range(1, seq_len + 1):
        tokens[:, i] = torch.where(noise[:, i], random[:, i], (7 * tokens[:, i - 1] + 3) % vocab)
    return tokens


def replica_micro_batches(batch: torch.Tensor, *, dp: int, dp_rank: int, micro_batch_size: int) -> list[torch.Tensor]:
    """This data-parallel replica's contiguous share of the global batch, cut into micro-batches."""
    share = batch.shape[0] // dp
    mine = batch[dp_rank * share:(dp_rank + 1) * share]
    return list(mine.split(micro_batch_size))
