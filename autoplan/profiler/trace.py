"""Trace one module's forward and backward on the meta device and measure what it costs.

Measured, not guessed:
- FLOPs forward and backward: torch.utils.flop_counter.FlopCounterMode;
- saved activations: every tensor autograd packs for backward (torch.autograd.graph.saved_tensors_hooks),
  deduplicated by storage, parameters and buffers excluded;
- which saved bytes tensor parallelism splits: a TorchDispatchMode follows each storage from the output
  of a column-parallel Linear (sharded) to the output of a row-parallel one (whole again), so a saved
  tensor is "tp-sharded" iff it lies between the two (Shoeybi et al. 2019, Sec. 3, Fig. 3);
- GEMM shapes (for the shape-dependent efficiency), and bytes moved by the other ops (memory-bound), in
  forward and in backward: a norm's or a loss's backward moves more than twice its forward's bytes, an
  activation's less, and under tp the replicated ops (norms, residuals) weigh more than at tp 1. In backward
  the sharding follows the gradients: a row-parallel Linear's input gradient is split by tp, a
  column-parallel one's is whole (after its all-reduce).

With attention="flash", F.scaled_dot_product_attention is routed to torch's memory-efficient attention
op while tracing, so the trace saves what a fused attention kernel saves on a GPU (q, k, v, out and the
log-sum-exp), not the seq x seq matrices of the math fallback that meta tensors would otherwise take;
F.dropout is routed to native_dropout, which saves a 1-byte mask as on CUDA.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from autoplan.costmodel.compute import is_streaming_op
from autoplan.kernels import gpu_kernels
from autoplan.selective import ATTENTION_BACKWARD_OPS, GEMM_OPS, kept_by_selective, moves_data

aten = torch.ops.aten
_FUSED_ATTENTION_OPS = {aten._scaled_dot_product_efficient_attention.default,
                        aten._scaled_dot_product_flash_attention.default}

# Leaf names of Linear modules whose output is split by tensor parallelism (column-parallel) or whose
# input is (row-parallel), as in Megatron-LM, Llama, GPT-2 and HF naming. Unknown names fall back to
# data flow: a Linear fed by a sharded tensor is row-parallel, any other is column-parallel.
COLUMN_PARALLEL = {"wq", "wk", "wv", "wqkv", "q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value",
                   "c_attn", "query_key_value", "w1", "w3", "fc1", "up_proj", "gate_proj", "c_fc", "fc_in",
                   "dense_h_to_4h", "output", "lm_head"}
ROW_PARALLEL = {"wo", "o_proj", "out_proj", "c_proj", "w2", "fc2", "down_proj", "fc_out", "dense_4h_to_h"}
REPLICATED = {"router", "gate"}


def storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def linear_split(name: str, module: nn.Linear, input_sharded: bool) -> str:
    """'n' column-parallel, 'k' row-parallel, 'none' replicated; for one Linear of a traced module."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in REPLICATED:
        return "none"
    if leaf in ROW_PARALLEL:
        return "k"
    if leaf in COLUMN_PARALLEL:
        return "n"
    return "k" if input_sharded else "n"


@dataclass
class GemmRecord:
    m: int
    n: int
    k: int
    tp_split: str


@dataclass
class TraceResult:
    """Costs of one traced call for the batch it was traced with."""

    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    attention_core_fwd_flops: float = 0.0
    attention_kv_bytes: int = 0              # the keys and values a fused attention kernel reads, as the model passes them
    activation_bytes: int = 0
    activation_tp_sharded_bytes: int = 0
    attention_score_bytes: int = 0
    output_bytes: int = 0
    activation_column_input_bytes: int = 0   # saved inputs of column-parallel Linears (all-gathered under DTensor SP)
    selective_bytes: int = 0                 # forward op outputs that save-all-but-square selective recompute keeps
    selective_tp_sharded_bytes: int = 0
    forward_peak_bytes: int = 0              # most live bytes in forward beyond what forward leaves saved
    backward_peak_bytes: int = 0             # most live bytes in backward beyond the saved ones at its start
    backward_peak_weight_bytes: int = 0      # the part of it that does not grow with the batch (weight gradients)
    memory_bound_bytes: float = 0.0
    streaming_bytes: float = 0.0             # the part of it moved by streaming ops (costmodel.compute.STREAMING_OPS)
    memory_bound_tp_sharded_bytes: float = 0.0  # the part of it on tensors tp splits
    memory_bound_bwd_bytes: float = 0.0      # the same three in backward (trace_layer: the part growing with the batch)
    streaming_bwd_bytes: float = 0.0
    memory_bound_bwd_tp_sharded_bytes: float = 0.0
    gemms: list[GemmRecord] = field(default_factory=list)
    linear_splits: dict[str, str] = field(default_factory=dict)  # Linear name -> n/k/none


class _Tracer(TorchDispatchMode):
    """Follows tp-sharding through storages and records GEMMs and memory-bound bytes in forward."""

    def __init__(self, result: TraceResult, frozen_storages: set[int]):
        super().__init__()
        self.result = result
        self.frozen = frozen_storages
        self.sharded: dict[int, bool] = {}
        self.score: set[int] = set()  # storages shaped [.., s_q, s_kv] that descend from Q K^T
        self.linear_stack: list[str] = []
        self.column_inputs: set[int] = set()  # storages fed to a column-parallel Linear
        self.selective_seen: dict[int, tuple] = {}  # storage id -> (weak ref, bytes, tp-sharded)
        self.live = LiveBytes()
        self.forward = True
        self.counting = True  # False while the stand-in loss runs: its ops are not the layer's
        self.backward_counting = False  # backward's memory-bound ops are counted (from the layer's output gradient)
        self.weight_split: dict[int, str] = {}  # a Linear weight's storage id -> its split (n/k/none)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        sharded = any(self.sharded.get(storage_id(t), False) for t in inputs)
        if not self.forward and func in GEMM_OPS:  # an input gradient: tp splits it iff the Linear is row-parallel
            split = next((self.weight_split[storage_id(t)] for t in inputs if storage_id(t) in self.weight_split), None)
            sharded = sharded if split is None else split == "k"
        scores = [t.shape[-2:] for t in inputs if t.dim() >= 2 and storage_id(t) in self.score]
        if not func.is_view:  # (storage ids are addresses and get reused: always overwrite)
            for t in outputs:
                sid = storage_id(t)
                self.sharded[sid] = sharded
                if t.dim() >= 2 and t.shape[-2:] in scores:
                    self.score.add(sid)
                else:
                    self.score.discard(sid)
        if not func.is_view and self.counting:
            for t in outputs:
                if storage_id(t) not in self.frozen:
                    self.live.add(t)
        if self.forward and self.counting:
            self._record(func, args, inputs, outputs, sharded)
            if not func.is_view and kept_by_selective(func, args):
                self._count_selective(outputs)
        elif self.backward_counting and func not in GEMM_OPS and func not in ATTENTION_BACKWARD_OPS \
                and moves_data(func):
            moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
            self.result.memory_bound_bwd_bytes += moved
            if is_streaming_op(str(func)):
                self.result.streaming_bwd_bytes += moved
            if sharded:
                self.result.memory_bound_bwd_tp_sharded_bytes += moved
        return out

    def _count_selective(self, outputs) -> None:
        for t in outputs:
            storage = t.untyped_storage()
            sid = storage._cdata
            seen = self.selective_seen.get(sid)
            if sid in self.frozen or (seen is not None and seen[0]() is not None):
                continue  # (a dead storage's address may come back: the policy would have kept both alive)
            nbytes, sharded = storage.nbytes(), self.sharded.get(sid, False)
            self.selective_seen[sid] = (weakref.ref(storage), nbytes, sharded)
            self.result.selective_bytes += nbytes
            if sharded:
                self.result.selective_tp_sharded_bytes += nbytes

    def reclassify(self, t: torch.Tensor, sharded: bool) -> None:
        """A Linear's output learns whether tp splits it after the op ran (_linear_post_hook)."""
        sid = storage_id(t)
        self.sharded[sid] = sharded
        seen = self.selective_seen.get(sid)
        if seen is not None and seen[0]() is not None and seen[2] != sharded:
            self.selective_seen[sid] = (seen[0], seen[1], sharded)
            self.result.selective_tp_sharded_bytes += seen[1] if sharded else -seen[1]

    def _record(self, func, args, inputs, outputs, sharded: bool = False) -> None:
        if func in GEMM_OPS:
            a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            if storage_id(a) in self.frozen or storage_id(b) in self.frozen:
                split = self.linear_stack[-1] if self.linear_stack else "none"
                self.result.gemms.extend(GemmRecord(m, n, k, split) for _ in range(batch))
            else:  # activation x activation: the attention core of an eager attention
                self.result.attention_core_fwd_flops += 2.0 * batch * m * k * n
                if m == n:  # Q K^T: the scores matrix [.., s, s]
                    self.score.update(storage_id(t) for t in outputs)
        elif func in _FUSED_ATTENTION_OPS:
            q, key, value = args[0], args[1], args[2]
            b, heads, s_q, d = q.shape
            self.result.attention_core_fwd_flops += 2.0 * b * heads * s_q * key.shape[-2] * (d + value.shape[-1])
            self.result.attention_kv_bytes += key.numel() * key.element_size() + value.numel() * value.element_size()
        elif moves_data(func):
            moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
            self.result.memory_bound_bytes += moved
            if is_streaming_op(str(func)):
                self.result.streaming_bytes += moved
            if sharded:  # on tensors tp splits (between a column- and a row-parallel GEMM)
                self.result.memory_bound_tp_sharded_bytes += moved


class LiveBytes:
    """Bytes of the storages registered and still alive (a weak reference per storage), and their peak
    since `reset_peak`. A storage found to be a parameter's gradient is dropped, also from the peak it was
    alive at (the cost model counts gradients apart)."""

    def __init__(self):
        self.bytes = 0
        self.peak = 0
        self._born: dict[int, tuple[int, int]] = {}  # storage id -> (bytes, clock at registration)
        self._clock = 0
        self._peak_clock = 0
        self.bytes_at_reset = 0

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        sid = storage._cdata
        if sid in self._born:
            return
        nbytes = storage.nbytes()
        self._clock += 1
        self._born[sid] = (nbytes, self._clock)
        self.bytes += nbytes
        weakref.finalize(storage, self._free, sid)
        if self.bytes > self.peak:
            self.peak, self._peak_clock = self.bytes, self._clock

    def _free(self, sid: int) -> None:
        nbytes, _ = self._born.pop(sid, (0, 0))
        self.bytes -= nbytes

    def drop(self, t: torch.Tensor) -> None:
        sid = storage_id(t)
        if sid in self._born:
            nbytes, born = self._born.pop(sid)
            self.bytes -= nbytes
            if born <= self._peak_clock:
                self.peak -= nbytes

    def reset_peak(self) -> None:
        self.peak, self._peak_clock, self.bytes_at_reset = self.bytes, self._clock, self.bytes


def _grad_leaf(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


def _hidden_slot(args: list, kwargs: dict, accept) -> tuple[str, int | str] | None:
    """Where the input flowing through the layer is: ("arg", index) of the first accepted tensor argument,
    else ("kw", name) of the first accepted tensor keyword argument (transformers passes hidden_states so)."""
    for i, value in enumerate(args):
        if isinstance(value, torch.Tensor) and accept(value):
            return "arg", i
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and accept(value):
            return "kw", name
    return None


def trace(module: nn.Module, args: tuple, kwargs: dict, *, vocab_size: int = 0, flash: bool = True) -> TraceResult:
    """Run module(*args, **kwargs) forward and backward on meta and measure it.

    The first floating-point argument becomes a leaf that needs grad (the hidden state flowing in).
    If the output's last dim is the vocabulary, a cross-entropy loss in fp32 is added, as training does.
    """
    result = TraceResult()
    frozen = {storage_id(t) for t in list(module.parameters()) + list(module.buffers())}
    args, kwargs = list(args), dict(kwargs)
    hidden = _hidden_slot(args, kwargs, lambda v: v.is_floating_point())
    if hidden is not None:
        where, key = hidden
        where_dict = args if where == "arg" else kwargs
        where_dict[key] = _grad_leaf(where_dict[key])
        # other tensor inputs (rotary tables, masks) are constants shared by every layer, not activations
        rest = (args[key + 1:], kwargs) if where == "arg" else ({k: v for k, v in kwargs.items() if k != key},)
        frozen |= {storage_id(t) for t in tree_flatten(rest)[0] if isinstance(t, torch.Tensor)}
    tracer = _Tracer(result, frozen)
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        sid = storage_id(t)
        if sid not in frozen and sid not in seen:
            seen.add(sid)
            nbytes = t.untyped_storage().nbytes()
            result.activation_bytes += nbytes
            if tracer.sharded.get(sid, False):
                result.activation_tp_sharded_bytes += nbytes
            if sid in tracer.score:
                result.attention_score_bytes += nbytes
            if sid in tracer.column_inputs:
                result.activation_column_input_bytes += nbytes
        return t

    hooks = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            hooks.append(sub.register_forward_pre_hook(_linear_pre_hook(name, tracer, result)))
            hooks.append(sub.register_forward_hook(_linear_post_hook(name, tracer, result)))
    # gradient accumulation's steady state: every parameter already has a gradient, so the one backward
    # computes is a temporary added into it (what backward_peak_bytes should see)
    params = [p for p in module.parameters() if p.requires_grad and p.grad is None]
    for param in params:
        param.grad = torch.zeros_like(param)
    counter = FlopCounterMode(display=False)
    try:
        with gpu_kernels(flash), counter, tracer:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = module(*args, **kwargs)
                first = next(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
                result.output_bytes = first.numel() * first.element_size()
                if vocab_size and first.shape[-1] == vocab_size:  # the loss is part of the head's step
                    loss = F.cross_entropy(first.float().flatten(0, -2), torch.zeros(first.shape[:-1].numel(),
                                           dtype=torch.long, device=first.device))
                    result.forward_peak_bytes = tracer.live.peak - tracer.live.bytes
                    tracer.backward_counting = True
                else:  # a stand-in loss that only seeds the output's gradient (its backward is not counted)
                    result.forward_peak_bytes = tracer.live.peak - tracer.live.bytes
                    if first.requires_grad:
                        first.register_hook(lambda grad: setattr(tracer, "backward_counting", True))
                    tracer.counting = False
                    loss = first.float().sum()
            result.fwd_flops = float(counter.get_total_flops())
            tracer.forward, tracer.counting = False, True
            tracer.live.reset_peak()
            if loss.requires_grad:
                loss.backward()
            result.backward_peak_bytes = tracer.live.peak - tracer.live.bytes_at_reset
            result.bwd_flops = float(counter.get_total_flops()) - result.fwd_flops
    finally:
        for hook in hooks:
            hook.remove()
        for param in params:
            param.grad = None
    return result


def _linear_pre_hook(name: str, tracer: _Tracer, result: TraceResult):
    def hook(module, inputs):
        sharded = bool(inputs) and tracer.sharded.get(storage_id(inputs[0]), False)
        split = result.linear_splits.setdefault(name, linear_split(name, module, sharded))
        tracer.linear_stack.append(split)
        tracer.weight_split[storage_id(module.weight)] = split
        if split == "n" and inputs:
            tracer.column_inputs.add(storage_id(inputs[0]))
    return hook


def _linear_post_hook(name: str, tracer: _Tracer, result: TraceResult):
    def hook(module, inputs, output):
        tracer.linear_stack.pop()
        split = result.linear_splits[name]
        if split != "none" and isinstance(output, torch.Tensor):
            tracer.reclassify(output, split == "n")
    return hook


def trace_layer(module: nn.Module, args: tuple, kwargs: dict, *, vocab_size: int = 0, flash: bool = True) -> TraceResult:
    """`trace` for one sequence, with its backward temporaries split in two by a second trace at two
    sequences: T(b) = a·b + w, so w = 2·T(1) - T(2) does not grow with the batch (weight-gradient
    temporaries: a stacked expert weight's gradient, an embedding table's) and a = T(1) - w does; backward's
    memory-bound bytes are a = T(2) - T(1) alone (w: adding each weight gradient into the accumulated one)."""
    one = trace(module, args, kwargs, vocab_size=vocab_size, flash=flash)
    doubled, doubled_kwargs = list(args), dict(kwargs)
    first = _hidden_slot(doubled, doubled_kwargs, lambda v: v.dim() and v.shape[0] == 1)
    if first is None:
        return one
    where, key = first
    inputs = doubled if where == "arg" else doubled_kwargs
    inputs[key] = inputs[key].expand(2, *inputs[key].shape[1:]).contiguous()
    two = trace(module, tuple(doubled), doubled_kwargs, vocab_size=vocab_size, flash=flash)
    weight = min(max(2 * one.backward_peak_bytes - two.backward_peak_bytes, 0), one.backward_peak_bytes)
    one.backward_peak_weight_bytes = weight
    one.backward_peak_bytes -= weight
    # backward's bytes per sequence: the part that grows with the batch (not the weight gradients' accumulation)
    for name in ("memory_bound_bwd_bytes", "streaming_bwd_bytes", "memory_bound_bwd_tp_sharded_bytes"):
        setattr(one, name, max(getattr(two, name) - getattr(one, name), 0.0))
    return one
