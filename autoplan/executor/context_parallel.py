"""Context parallelism: each micro-batch's sequence split over the cp ranks, attention run as a ring.

Layout (torch's load-balanced sharding, `_HeadTailLoadBalancer`): a sequence of s tokens is cut into
2·cp chunks of s/(2·cp) tokens and cp rank r holds chunks r and 2·cp−1−r, so every rank carries the same
share of the causal mask's work. Sharded so, per micro-batch: the inputs and targets (dim 1), the RoPE
table `freqs` of every module holding one (dim 0), the positions that a learned position embedding
(`embed.pos`, looked up with arange(s) by the reference GPT and GPT-2's layout) reads: a forward pre-hook
maps them to the rank's global positions; and those a model that computes its rotary tables per forward
from position ids reads (`global_positions`, set on the Hugging Face layout, autoplan.models.hf).

Attention on those shards, forward and backward, is torch's ring attention (Liu et al. 2023): each rank
keeps its query shard, the key/value shards go round the cp group, and the partial outputs merge by
their log-sum-exp.
- cuda: torch's `context_parallel` context manager, torchtitan's recipe: it patches
  F.scaled_dot_product_attention and runs the flash / memory-efficient / cuDNN kernels in its ring.
- cpu: that context manager fails in torch 2.13, its dispatcher knows the CUDA kernels only ("Operator
  aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
  registered"). There a TorchDispatchMode runs the CPU flash kernel that F.scaled_dot_product_attention
  calls, and its backward, through the ring functions behind that context manager
  (`_templated_ring_attention` and its backward): the same layout, ring and merge.
The forward and the backward of a micro-batch both run inside `ContextParallel.micro_batch` (the ring
backward, and recompute re-running attention, happen during backward).

Loss and gradients: each rank's loss is the mean over its s/cp tokens, the same count on every rank, so
the mean over the cp ranks is the mean over all tokens; parameters are replicated over cp, so averaging
the gradients over dp×cp (DDP or FSDP2 over the flattened ("dp", "cp") mesh, `mesh.replica_mesh`;
torchtitan's dp_shard_cp) gives the gradient of that mean. The cp ranks' RoPE tables are different
shards, which no wrapper undoes: composable DDP (`replicate`) hands DDP the parameters only, so it
broadcasts no buffers, and FSDP2 leaves buffers alone.

Supported: cp with dp (every ZeRO stage), pp (every schedule), tp (with or without sequence parallelism,
ZeRO stage 1-3) and recompute. Refused (`check_context_parallel`): cp with ep; cp with tp at ZeRO stage
0 (DDP over a tensor-parallel model misses the single-process gradients, with or without cp); attention
that is not F.scaled_dot_product_attention(is_causal=True) without mask or dropout (the reference
models' attn_impl="eager" among them); a sequence not divisible by 2·cp; a Hugging Face model whose positions
the layout did not find (support.FOREIGN_CP).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental import context_parallel
from torch.distributed.tensor.experimental._context_parallel._attention import (
    _context_parallel_buffers, _cp_options, _templated_ring_attention, _templated_ring_attention_backward)
from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
from torch.utils._python_dispatch import TorchDispatchMode

from autoplan.errors import InvalidPlanError
from autoplan.schema import Plan
from autoplan.support import FOREIGN_CP

SEQ_DIM = 2  # the sequence dim of q, k, v [b, heads, s, head_dim] as SDPA takes them
ROPE_TABLE = "freqs"  # the reference models' RoPE buffer [s, head_dim/2, 2]
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def check_context_parallel(model: nn.Module, plan: Plan) -> None:
    """Refuse, in one line, a cp plan this executor cannot run."""
    eager = [name for name, module in model.named_modules() if getattr(module, "impl", None) == "eager"]
    if eager:
        raise InvalidPlanError(f"cp={plan.cp} needs attention through F.scaled_dot_product_attention, but {eager[0]} "
                               "computes it eagerly (attn_impl='eager'): it would see only this rank's tokens")
    unplaced = [m for m in model.modules() if getattr(m, "positions_found", True) is False]
    if unplaced:
        raise InvalidPlanError(FOREIGN_CP.format(model=unplaced[0].hf_class))


class ContextParallel:
    """The cp axis of a parallelised model: shards each micro-batch and runs its attention as a ring."""

    def __init__(self, model: nn.Module, cp_mesh: DeviceMesh, device_type: str):
        self.mesh, self.device_type, self.size = cp_mesh, device_type, cp_mesh.size()
        self._tables = {id(t): t for m in model.modules() if isinstance(t := m._buffers.get(ROPE_TABLE), torch.Tensor)}
        self._positions: torch.Tensor | None = None  # this rank's global positions while a micro-batch runs
        self._expect_attention = _holds_blocks(model)
        self._position_users = [m for m in model.modules() if hasattr(m, "global_positions")]
        for module in model.modules():  # the model, or the pipeline chunk holding the embedding
            pos = getattr(getattr(module, "embed", None), "pos", None)
            if isinstance(pos, nn.Embedding):
                pos.register_forward_pre_hook(self._global_positions)

    def _global_positions(self, module: nn.Module, args: tuple):
        return None if self._positions is None else (self._positions[args[0]],)

    @contextmanager
    def micro_batch(self, tokens: torch.Tensor):
        """(inputs, targets), each [b, s/cp], this rank's shard of `tokens` [b, s + 1]; run the forward and
        the backward inside. Shards the model's RoPE tables in place and restores them on exit."""
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        seq = inputs.shape[1]
        if seq % (2 * self.size):
            raise InvalidPlanError(f"cp={self.size} needs a sequence divisible by 2*cp = {2 * self.size}, got {seq}")
        tables = list(self._tables.values())
        for table in tables:
            if table.shape[0] != seq:
                raise InvalidPlanError(f"cp={self.size} shards the RoPE table with the sequence, but it has "
                                       f"{table.shape[0]} positions and the sequence {seq} tokens")
        positions = torch.arange(seq, device=tokens.device)
        buffers, seq_dims = [inputs, targets, positions, *tables], [1, 1, 0] + [0] * len(tables)
        if self.device_type == "cuda":
            region = context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=seq_dims,
                                      no_restore_buffers={inputs, targets, positions})
        else:
            region = _cpu_ring_region(self.mesh, buffers, seq_dims, restore=tables,
                                      expect_attention=self._expect_attention)
        with region:
            self._set_positions(positions)
            try:
                yield inputs, targets
            finally:
                self._set_positions(None)

    def _set_positions(self, positions: torch.Tensor | None) -> None:
        self._positions = positions
        for module in self._position_users:
            module.global_positions = positions


@contextmanager
def _cpu_ring_region(mesh: DeviceMesh, buffers: list[torch.Tensor], seq_dims: list[int], *,
                     restore: list[torch.Tensor], expect_attention: bool):
    """What torch's `context_parallel` does, with a ring that runs on CPU: shard `buffers` in place
    (load-balanced), send SDPA to the ring, put the `restore` buffers back on exit. With
    `expect_attention`, a region that ran no attention kernel is an error: the model's attention saw
    only this rank's tokens."""
    originals = [t.clone() for t in restore]
    balancer = _HeadTailLoadBalancer(buffers[0].shape[seq_dims[0]], mesh.size(), buffers[0].device)
    with torch.no_grad():
        for buffer, shard in zip(buffers, _context_parallel_buffers(mesh, buffers, seq_dims, balancer)):
            shard = shard.clone()
            buffer.resize_(shard.shape).copy_(shard)
    mode = _RingAttentionMode(mesh.get_group())
    try:
        with mode:
            yield
    finally:
        with torch.no_grad():
            for buffer, original in zip(restore, originals):
                buffer.resize_(original.shape).copy_(original)
    if expect_attention and mode.calls == 0:
        raise InvalidPlanError(f"cp={mesh.size()} but the model made no F.scaled_dot_product_attention call: "
                               "its attention saw only this rank's tokens")


def _holds_blocks(model: nn.Module) -> bool:
    """False only for reference-layout pipeline chunks that hold no transformer block (nothing attends)."""
    block_lists = [m.layers for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleDict)]
    return not block_lists or any(len(blocks) for blocks in block_lists)


class _RingAttentionMode(TorchDispatchMode):
    """Runs the CPU flash-attention kernels (what F.scaled_dot_product_attention calls on CPU) as torch's
    load-balanced ring over `group`, forward and backward; autograd records the kernel as usual, so the
    backward (and a recomputed forward) must run inside the mode too. Counts the forward calls."""

    def __init__(self, group):
        super().__init__()
        self.group, self.calls = group, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _FLASH_CPU:
            self.calls += 1
            return _ring_forward(self.group, *args, **kwargs)
        if func is _FLASH_CPU_BACKWARD:
            return _ring_backward(self.group, *args, **kwargs)
        return func(*args, **kwargs)


def _ring_forward(group, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """(out, logsumexp) of this rank's query shard over every rank's key/value shards: the kernel's signature."""
    if attn_mask is not None or not is_causal or dropout_p:
        raise InvalidPlanError("context parallelism runs causal attention without a mask or dropout (torch's "
                               f"load-balanced ring); got attn_mask={'a tensor' if attn_mask is not None else None}, "
                               f"is_causal={is_causal}, dropout_p={dropout_p}")
    with _load_balanced_ring():
        out, logsumexp = _templated_ring_attention(group, SEQ_DIM, _FLASH_CPU, query, key, value, is_causal=True,
                                                   scale=scale)
    return out, logsumexp


def _ring_backward(group, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                   scale=None):
    """(grad_query, grad_key, grad_value) of `_ring_forward`: the backward kernel's signature."""
    with _load_balanced_ring():
        grads = _templated_ring_attention_backward(group, SEQ_DIM, _FLASH_CPU_BACKWARD, grad_out, "grad_out", query,
                                                   key, value, out, logsumexp, is_causal=True, dropout_p=0.0,
                                                   scale=scale)
    return tuple(grads)


@contextmanager
def _load_balanced_ring():
    """torch's ring reads its layout from a module-level option; the shards here are always load-balanced."""
    before = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = True
    try:
        yield
    finally:
        _cp_options.enable_load_balance = before


def sequence_shard(cp: ContextParallel | None, tokens: torch.Tensor):
    """A context giving (inputs, targets) of micro-batch `tokens` [b, s + 1]: the whole sequence, or this
    rank's shard of it under context parallelism (run the forward and the backward inside)."""
    if cp is None:
        return nullcontext((tokens[:, :-1], tokens[:, 1:]))
    return cp.micro_batch(tokens)
