"""Record what one rank executes in a training step, as plain data for costmodel.trace_time to price.

`StepTracer` is a TorchDispatchMode that sits above the memory tracker (executor.memtrack) in a dry run
and sees every op the rank runs, below DTensor (the local ops and collectives tensor parallelism issues):
- a compute op becomes a TraceEvent with its FLOPs (GEMMs and fused attention, as torch.utils.flop_counter
  counts them: 2·m·n·k per GEMM, 2·b·h·s_q·s_kv·(d + d_v) per attention forward and 2.5x that backward)
  or the bytes it reads and writes (every other op that is not a view: the profiler's rule,
  profiler.trace), and its input shapes;
- a collective (c10d's ops, the functional collectives DTensor uses) becomes one with its kind, the
  message bytes (the full buffer for all-reduce, all-gather and reduce-scatter, what one rank sends for
  all-to-all: costmodel.comm's convention), its group's size, the nodes the group spans for the
  cluster's gpus_per_node, and the mesh axis the group is (tp, cp, dp, ep, pp);
- where the rank waits for it: the first op that reads its result (data flow: a storage written by a
  collective), a synchronous call (async_op=False) right after it, and the end of each backward pass for
  what the backward issued (DDP and FSDP wait for their reductions there).

Which phase an op belongs to: forward; backward (the autograd engine runs); recompute (inside
torch.utils.checkpoint's recomputation); optimizer (inside optimizer.step); sync (averaging gradients by
hand after the micro-batches, and what follows the optimizer step). FSDP2's copy-in before its all-gather
and its post-reduce work run on communication streams on a GPU: they are marked stream="comm".
DDP's bucket all-reduces are not ops in a dry run (its hook hands the bucket back, and its first step has
a single bucket): the tracer issues them as the rebuilt buckets of a running job fill (`watch_ddp`).
"""

from __future__ import annotations

import contextlib
from functools import wraps
from unittest import mock

import torch
import torch.distributed as dist
from torch._guards import active_fake_mode
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autoplan.costmodel.comm import group_topology
from autoplan.costmodel.trace_time import TraceEvent
from autoplan.schema import Plan
from autoplan.selective import ATTENTION_BACKWARD_OPS, FUSED_ATTENTION_OPS, GEMM_OPS, moves_data

aten = torch.ops.aten
_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")
_FREE_OPS = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten.detach.default, aten.lift_fresh.default,
             aten._local_scalar_dense.default, aten.resize_.default, aten.set_.source_Storage,
             aten.set_.source_Storage_storage_offset, torch.ops.prim.device.default}
ATTENTION_BWD_FLOPS_FACTOR = 2.5  # torch.utils.flop_counter's SDPA backward: five matmuls to the forward's two
_KINDS = (("allreduce", "all_reduce"), ("all_reduce", "all_reduce"), ("allgather", "all_gather"),
          ("all_gather", "all_gather"), ("reduce_scatter", "reduce_scatter"), ("alltoall", "all_to_all"),
          ("all_to_all", "all_to_all"), ("broadcast", "broadcast"), ("send", "send"), ("recv", "recv"))
_ACTIVE: list[StepTracer] = []


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _argument(func, args, kwargs, name: str, default=None):
    """The value of schema argument `name` of `func` called on (args, kwargs)."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == name:
            if i < len(args):
                return args[i]
            return kwargs.get(name, arg.default_value if arg.has_default_value() else default)
    return default


def _returns_view(func) -> bool:
    return func.is_view or any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def collective_kind(func) -> str | None:
    """'all_reduce', 'all_gather', ... for a collective op, 'wait' for wait_tensor, None for the rest."""
    if func.namespace not in _COLLECTIVE_NAMESPACES:
        return None
    name = func._opname
    if name == "wait_tensor":
        return "wait"
    return next((kind for key, kind in _KINDS if key in name), None)


def _group_ranks(func, args, kwargs) -> list[int]:
    """Global ranks of the process group a collective runs on."""
    name = _argument(func, args, kwargs, "group_name")
    if isinstance(name, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        return dist.get_process_group_ranks(_resolve_process_group(name))
    for i, arg in enumerate(func._schema.arguments):
        if "ProcessGroup" in str(arg.type):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            return dist.get_process_group_ranks(dist.ProcessGroup.unbox(value))
    return [dist.get_rank()]


def message_bytes(kind: str, func, args, kwargs, result, group_size: int) -> int:
    """M as costmodel.comm counts it: the full buffer of an all-reduce, the gathered output of an
    all-gather, the input before scattering of a reduce-scatter, what one rank sends in an all-to-all."""
    name = func._opname
    if kind == "all_gather":
        if name in ("_allgather_base_", "allgather_into_tensor_coalesced_"):
            return _nbytes(_tensors(args[0]))
        if name == "allgather_":
            return _nbytes(_tensors(args[1])) * group_size
        return _nbytes(_tensors(result))  # functional: the gathered output
    if kind == "reduce_scatter":
        if name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
            return _nbytes(_tensors(args[1]))
        if name == "reduce_scatter_":
            return _nbytes(_tensors(args[0])) * group_size
        return _nbytes(_tensors(args[0]))  # functional: the input
    if kind == "all_to_all" and name in ("alltoall_base_", "alltoall_"):
        return _nbytes(_tensors(args[1]))
    return _nbytes(_tensors(args[0]))      # all-reduce, broadcast, send, recv, functional all-to-all: the input


def mesh_axis(kind: str, start: int, stride: int, size: int, plan: Plan) -> str:
    """Which of the plan's mesh axes a group of `size` ranks `stride` apart is (executor.mesh's layout:
    tp innermost, then cp, dp, pp); an all-to-all under expert parallelism is the ep group's (ep ranks etp
    apart), and so are expert tensor parallelism's (its token all-gather and output reduce-scatter run as
    all-to-alls over etp consecutive ranks: executor.expert_parallel), both priced as the token dispatcher's
    ep_comm; anything else (dp x cp replicas, expert-data-parallel ranks) is data-parallel."""
    if kind == "all_to_all" and ((plan.ep > 1 and size == plan.ep and stride == plan.etp)
                                 or (plan.etp > 1 and size == plan.etp and stride == 1)):
        return "ep"
    if stride == 1 and size == plan.tp:
        return "tp"
    if stride == plan.tp and size == plan.cp:
        return "cp"
    if size == plan.pp and stride == plan.tp * plan.cp * plan.dp:
        return "pp"
    return "dp"


class StepTracer(TorchDispatchMode):
    """Records the TraceEvents of what runs while `enabled` (module docstring). `plan` names the mesh
    axes, `gpus_per_node` places the groups on nodes."""

    def __init__(self, plan: Plan, *, gpus_per_node: int):
        super().__init__()
        self.plan, self.gpus_per_node = plan, gpus_per_node
        self.events: list[TraceEvent] = []
        self.enabled = False
        self.micro_batch = 0
        self.in_optimizer = False
        self.after_update = False     # the optimizer step is done: what follows is bookkeeping (sync)
        self.syncing = 0              # inside gradient averaging by hand
        self.recomputing = 0          # inside torch.utils.checkpoint's recomputation
        self.gather_stream = 0        # inside FSDP's all-gather (copy-in and collective: streams of their own)
        self.reduce_stream = 0        # inside FSDP's reduce-scatter work (a stream that waits for compute)
        self._writer: dict[int, int] = {}          # storage -> index of the collective or comm op that wrote it
        self._backward_pending: set[int] = set()   # collectives issued by the running backward
        self._last_phase = ""
        self._fake_on_entry = None
        self._ddp = None               # (DDP module, its process group, gradients of the bucket being filled)
        self._ddp_buckets = 0

    # ------------------------------------------------------------------------------ phase and step
    def start_step(self) -> None:
        self.enabled, self.micro_batch, self.after_update, self._last_phase = True, 0, False, ""

    def phase(self) -> str:
        if self.in_optimizer:
            return "optimizer"
        if self.syncing or self.after_update:
            return "sync"
        if torch._C._current_graph_task_id() != -1:
            return "recompute" if self.recomputing else "backward"
        return "forward"

    def _enter_phase(self) -> str:
        phase = self.phase()
        was_backward = self._last_phase in ("backward", "recompute")
        if was_backward and phase not in ("backward", "recompute"):
            if self._backward_pending:  # DDP / FSDP wait for the backward's reductions before it returns
                self._append("wait", "wait", self._last_phase, after=tuple(sorted(self._backward_pending)))
                self._backward_pending.clear()
            if phase == "forward" and self.plan.pp == 1:
                self.micro_batch += 1
        self._last_phase = phase
        return phase

    def _append(self, kind: str, op: str, phase: str, **fields) -> TraceEvent:
        side = (self.gather_stream or self.reduce_stream) and kind != "wait"
        event = TraceEvent(index=len(self.events), kind=kind, op=op, phase=phase, micro_batch=self.micro_batch,
                           stream="comm" if side else "compute", waits_for_compute=not self.gather_stream, **fields)
        self.events.append(event)
        return event

    # ------------------------------------------------------------------------------ recording
    def _depends_on(self, inputs) -> tuple[int, ...]:
        return tuple(sorted({self._writer[sid] for t in inputs
                             if (sid := t.untyped_storage()._cdata) in self._writer}))

    def _wrote(self, event: TraceEvent, outputs) -> None:
        for t in outputs:
            sid = t.untyped_storage()._cdata
            if event.is_collective or event.stream == "comm":
                self._writer[sid] = event.index
            else:
                self._writer.pop(sid, None)

    def record_collective(self, kind: str, op: str, nbytes: int, ranks: list[int], inputs, outputs,
                          *, synchronous: bool = False) -> None:
        phase = self._enter_phase()
        size = len(ranks)
        if size <= 1:
            return
        stride = ranks[1] - ranks[0]
        topo = group_topology(group_size=size, stride=stride, gpus_per_node=self.gpus_per_node)
        axis = mesh_axis(kind, ranks[0], stride, size, self.plan)
        if axis == "cp" and (self.gather_stream or self.reduce_stream or self.syncing or self.in_optimizer
                             or op.startswith("ddp.")):
            axis = "dp"  # the replicas' gradients and parameters over a cp-shaped group (dp = 1): data parallelism
        event = self._append(kind, op, phase, bytes_moved=float(nbytes), group_size=size, group_nodes=topo.nodes,
                             group_ranks_per_node=topo.ranks_per_node, axis=axis,
                             after=self._depends_on(inputs), shapes=tuple(tuple(t.shape) for t in inputs[:4]))
        self._wrote(event, outputs)
        if synchronous:
            self._append("wait", "wait", phase, after=(event.index,))
        elif phase in ("backward", "recompute") and kind not in ("send", "recv"):
            self._backward_pending.add(event.index)

    def watch_ddp(self, ddp, group) -> list:
        """Record DDP's bucketed gradient all-reduces as a run after its first step issues them: DDP rebuilds
        its buckets then, in the order gradients become ready, the first of dist._DEFAULT_FIRST_BUCKET_BYTES,
        the others of bucket_bytes_cap (DDP's first step, and so a dry run, has one bucket of every
        gradient). Returns the hook handles."""
        self._ddp = (ddp, group, [])
        return [p.register_post_accumulate_grad_hook(self._ddp_gradient_ready)
                for p in ddp.module.parameters() if p.requires_grad]

    def _ddp_gradient_ready(self, param) -> None:
        ddp, group, bucket = self._ddp
        if not self.enabled or not ddp.require_backward_grad_sync:
            return
        bucket.append(param.grad)
        cap = dist._DEFAULT_FIRST_BUCKET_BYTES if not self._ddp_buckets else ddp.bucket_bytes_cap
        if _nbytes(bucket) >= cap:
            self._flush_ddp_bucket()

    def _flush_ddp_bucket(self) -> None:
        ddp, group, bucket = self._ddp
        if bucket:
            self._ddp_buckets += 1
            # waited for at the end of the backward (DDP's finalize); the reducer's own copies of the gradients
            # into its one first-step bucket are no reads of the result
            self.record_collective("all_reduce", "ddp.bucket_all_reduce", _nbytes(bucket),
                                   dist.get_process_group_ranks(group), list(bucket), [])
            bucket.clear()

    def record_ddp_bucket(self, buffer: torch.Tensor, group) -> None:
        """DDP's hook ran on its one bucket (the end of a backward that syncs): issue what is left of the
        rebuilt buckets (watch_ddp), or, without watch_ddp, the bucket's all-reduce."""
        if not self.enabled:
            return
        if self._ddp is not None:
            self._flush_ddp_bucket()
            self._ddp_buckets = 0
        else:
            self.record_collective("all_reduce", "ddp.bucket_all_reduce", _nbytes([buffer]),
                                   dist.get_process_group_ranks(group), [buffer], [buffer])

    def _record_compute(self, func, args, kwargs, result) -> None:
        inputs, outputs = _tensors((args, kwargs)), _tensors(result)
        phase = self._enter_phase()
        fields = dict(after=self._depends_on(inputs), shapes=tuple(tuple(t.shape) for t in inputs[:4]))
        if func in GEMM_OPS:
            a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            event = self._append("gemm", str(func), phase, flops=2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1],
                                 **fields)
        elif func in FUSED_ATTENTION_OPS or func in ATTENTION_BACKWARD_OPS:
            backward = func in ATTENTION_BACKWARD_OPS
            q, k, v = (args[1], args[2], args[3]) if backward else (args[0], args[1], args[2])
            b, heads, s_q, d = q.shape
            flops = 2.0 * b * heads * s_q * k.shape[-2] * (d + v.shape[-1])
            event = self._append("attention", str(func), phase,
                                 flops=flops * (ATTENTION_BWD_FLOPS_FACTOR if backward else 1.0),
                                 causal=bool(_argument(func, args, kwargs, "is_causal", False)), **fields)
        else:
            moved = _nbytes(inputs) + _nbytes(outputs) if moves_data(func) else 0
            event = self._append("memory", str(func), phase, bytes_moved=float(moved), **fields)
        self._wrote(event, outputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t is DTensor for t in types):  # DTensor runs its local ops: record those
            return NotImplemented
        result = func(*args, **kwargs)
        if not self.enabled or func in _FREE_OPS or active_fake_mode() is not self._fake_on_entry:
            return result
        kind = collective_kind(func)
        if kind == "wait":
            self._append("wait", str(func), self._enter_phase(), after=self._depends_on(_tensors(args)))
        elif kind is not None:
            ranks = _group_ranks(func, args, kwargs)
            inputs = _tensors(args)
            synchronous = _argument(func, args, kwargs, "async_op", True) is False
            if kind == "send":
                written = []
            elif func._opname.endswith("_"):  # c10d's in-place collectives write their tensor arguments
                written = _tensors(result) + inputs
            else:
                written = _tensors(result)
            self.record_collective(kind, str(func), message_bytes(kind, func, args, kwargs, result, len(ranks)),
                                   ranks, inputs, written, synchronous=synchronous)
        elif func.namespace == "aten" and not _returns_view(func):
            self._record_compute(func, args, kwargs, result)
        return result

    def __enter__(self):
        self._fake_on_entry = active_fake_mode()
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)


def active() -> StepTracer | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def phase_marks(tracer: StepTracer, optimizer, train_module):
    """Tell `tracer` where the optimizer step, gradient averaging by hand, recomputation and FSDP's
    communication-stream work begin and end (hooks and wrappers; removed on exit)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    from torch.utils import checkpoint

    def counting(attribute: str, function):
        @wraps(function)
        def inner(*args, **kwargs):
            setattr(tracer, attribute, getattr(tracer, attribute) + 1)
            try:
                return function(*args, **kwargs)
            finally:
                setattr(tracer, attribute, getattr(tracer, attribute) - 1)
        return inner

    class Recomputation(checkpoint._recomputation_hook):
        def __enter__(self):
            tracer.recomputing += 1
            return super().__enter__()

        def __exit__(self, *exc):
            tracer.recomputing -= 1
            return super().__exit__(*exc)

    def before_step(*_):
        tracer._enter_phase()
        tracer.in_optimizer = True

    def after_step(*_):
        tracer.in_optimizer, tracer.after_update = False, True

    hooks = [optimizer.register_step_pre_hook(before_step), optimizer.register_step_post_hook(after_step)]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [h.remove() for h in hooks])
        stack.enter_context(mock.patch.object(checkpoint, "_recomputation_hook", Recomputation))
        for name in ("all_reduce_gradients", "average_gradients"):
            stack.enter_context(mock.patch.object(train_module, name, counting("syncing", getattr(train_module, name))))
        for name, stream in (("foreach_all_gather", "gather_stream"), ("foreach_reduce", "reduce_stream")):
            stack.enter_context(mock.patch.object(_fsdp_param_group, name,
                                                  counting(stream, getattr(_fsdp_param_group, name))))
        yield tracer
