"""Count every byte of tensor memory one rank holds while it trains, by category, at its peak.

torch's FSDP2 memory tracker (torch.distributed._tools.fsdp2_mem_tracker) does the counting: a
TorchDispatchMode that sees every tensor an op creates, keeps a weak reference to its storage (so the
bytes are given back when the storage dies, and storage resizes are followed), and hooks FSDP's
all-gathers and reduce-scatters. `RankMemoryTracker` extends it to any module a plan produces (DDP,
tensor-parallel DTensors, a list of pipeline chunks, each maybe FSDP-wrapped) and files each tensor
under the categories the cost model predicts (costmodel.rank_memory):

| category    | what                                                                                         |
|-------------|----------------------------------------------------------------------------------------------|
| params      | the parameters in the layout the ZeRO stage prescribes (Rajbhandari et al. 2020): whole up to stage 2 (FSDP without resharding: the gathered copies), sharded at stage 3; module buffers |
| grads       | the gradients the optimizer reads (sharded under FSDP)                                        |
| optimizer   | tensors in the optimizer's state (fp32 master weights, moments)                               |
| activations | what forward creates and is still alive: saved for backward, logits, inputs                  |
| temporaries | what backward and the optimizer step create: activation gradients, recomputed activations, scratch |
| buffers     | every other copy and communication buffer: FSDP's gathered layers (stage 3), its sharded storage (stage 2, beside the gathered copy), unsharded gradients and reduce-scatter inputs, DDP's gradient buckets, pipeline receive buffers |
| host        | (apart from the GPU's bytes) what an offloading plan keeps in host memory: an offloaded optimizer's states and its step's scratch, FSDP2 CPUOffloadPolicy's sharded parameters and gradients |

A tensor is born under its phase's category (forward: activations; backward and optimizer step:
temporaries) and is re-filed when its role is learnt (a gradient, an optimizer state, a buffer); the
peaks it was alive at move with it.

The counting runs on fake tensors as well as real ones: with a FakeTensorMode underneath, no byte is
allocated and the same numbers come out. `.item()` on a fake tensor has no value; the tracker answers 1
(an optimizer step count, a loss to log), which is all the training loop does with such values.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial, wraps

import torch
from torch import nn
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType, _FSDPState
from torch.distributed._tools.mem_tracker import MemTracker, _RefType, _UpdateType
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

_TOTAL = "Total"
_c10d = torch.ops.c10d
_SCALAR = torch.ops.aten._local_scalar_dense.default
_DEVICE = torch.ops.prim.device.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default


class Category(_RefType):
    PARAMS = "params"
    GRADS = "grads"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"
    BUFFERS = "buffers"
    HOST = "host"  # offloaded states in host memory (Plan.offload): counted apart, not in the GPU's bytes


CATEGORIES = tuple(c.value for c in Category if c is not Category.HOST)


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward pass now (what ModTracker.is_bw reads)."""
    return torch._C._current_graph_task_id() != -1


def _fsdp_groups(model: nn.Module):
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                yield module, group


class RankMemoryTracker(FSDPMemTracker):
    """Peak tensor memory of one rank and its breakdown (CATEGORIES), over everything run inside it.

    `model` is what the executor trains (FSDP-wrapped or not, or a ModuleList of pipeline chunks);
    `optimizer` its optimizer. `peak_bytes`, `peak_breakdown()`, `peak_phase` and `phase_peaks` (the
    peak of each phase: 'step 1 forward', 'step 2 backward', ...) read the result.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        MemTracker.__init__(self)  # FSDPMemTracker.__init__ insists on an FSDP root; any module is fine here
        self._root_mod, self._optm = model, optimizer
        self._fsdp_mod_to_saved_methods = {}
        self._fsdp_state = _FSDPState.PRE_FW
        self._ref_class = Category
        self._in_step = False
        self._as_buffers = False      # inside `filing_as_buffers`: new tensors are buffers
        self._hooks: list = []
        self._gathered_is_param: dict[int, bool] = {}  # id(FSDP param group) -> its unsharded copy is `params`
        self.step_label = ""          # set by the caller ("step 1"); the phase adds forward/backward/optimizer
        self.phase_peaks: dict[str, tuple[int, dict, int]] = {}  # phase -> (peak bytes, snapshot, clock then)
        self._clock = 0               # ops dispatched so far
        self.host_peak_bytes = 0      # most bytes filed as host memory at once
        self._host_params: set[int] = set()  # FSDP shards CPUOffloadPolicy keeps in host memory

    # -------------------------------------------------------------------------------- results
    @property
    def peak_phase(self) -> str:
        """The phase ('step 2 backward', ...) in which memory peaked."""
        return max(self.phase_peaks, key=lambda label: self.phase_peaks[label][0]) if self.phase_peaks else ""

    @property
    def peak_bytes(self) -> int:
        return self.phase_peaks[self.peak_phase][0] if self.phase_peaks else 0

    def peak_breakdown(self, phase: str | None = None) -> dict[str, int]:
        """Bytes by category at the peak of `phase` (default: the overall peak), summed over devices."""
        out = dict.fromkeys(CATEGORIES, 0)
        snapshot = self.phase_peaks[phase or self.peak_phase][1] if self.phase_peaks else {}
        for snap in snapshot.values():
            for tag, nbytes in snap.items():
                if tag not in (_TOTAL, Category.HOST):
                    out[tag.value] += nbytes
        return out

    def current_bytes(self) -> int:
        """Bytes on the GPU now (host memory apart)."""
        return sum(snap.get(_TOTAL, 0) - snap.get(Category.HOST, 0) for snap in self._curr_mem_snap.values())

    def current_host_bytes(self) -> int:
        return sum(snap.get(Category.HOST, 0) for snap in self._curr_mem_snap.values())

    @property
    def _offloaded(self) -> bool:
        return bool(getattr(self._optm, "offloaded", False))

    def file(self, tensors, category: Category) -> None:
        """File these tensors (and the peaks they were alive at) under `category`."""
        tree_map_only(torch.Tensor, lambda t: self._update_and_maybe_create_winfos(t, category), tensors)

    @contextmanager
    def filing_as_buffers(self):
        """Tensors created inside are buffers (DDP's gradient buckets, made when DDP initialises)."""
        self._as_buffers = True
        try:
            yield
        finally:
            self._as_buffers = False

    # -------------------------------------------------------------------------------- instrumentation
    def _register_module_and_optimizer_hooks(self) -> None:
        self._instrument_fsdp_module()
        sharded = set()
        for _, group in _fsdp_groups(self._root_mod):
            gathered_is_param = not group._reshard_after_forward  # ZeRO-2: the gathered copy is `params`
            self._gathered_is_param[id(group)] = gathered_is_param
            for fsdp_param in group.fsdp_params:
                sharded.add(id(fsdp_param.sharded_param))
                on_host = fsdp_param.offload_to_cpu  # CPUOffloadPolicy: the shard lives in host memory
                if on_host:
                    self._host_params.add(id(fsdp_param.sharded_param))
                self.file(fsdp_param.sharded_param, Category.HOST if on_host else
                          Category.BUFFERS if gathered_is_param else Category.PARAMS)
                if fsdp_param.sharded_param.grad is not None:
                    self.file(fsdp_param.sharded_param.grad, Category.HOST if on_host else Category.GRADS)
        for param in self._root_mod.parameters():
            if id(param) in sharded:
                continue
            self.file(param, Category.PARAMS)
            if param.grad is not None:
                self.file(param.grad, Category.GRADS)
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(lambda p: self.file(p.grad, Category.GRADS)))
        self.file(list(self._root_mod.buffers()), Category.PARAMS)
        if self._optm is not None:
            self._file_optimizer_states()
            self._hooks += [self._optm.register_step_pre_hook(self._step_pre_hook),
                            self._optm.register_step_post_hook(self._step_post_hook)]

    def _instrument_fsdp_sharded_params_grads(self, fsdp_param_group) -> None:
        pass  # filed in _register_module_and_optimizer_hooks, by ZeRO stage

    def _update_and_maybe_create_winfos(self, t, reftype, update_existing=False):
        # FSDPMemTracker._instrument_fsdp_module files the root's module buffers with its own tag
        category = Category.PARAMS if reftype is _FSDPRefType.BUFFER else reftype
        return super()._update_and_maybe_create_winfos(t, category, update_existing)

    def _deregister_module_and_optimizer_hooks(self) -> None:
        super()._deregister_module_and_optimizer_hooks()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _step_pre_hook(self, optimizer, args, kwargs) -> None:
        # gradients that were assigned rather than accumulated (a pipeline's weight-gradient step) met no
        # accumulate hook: file every gradient now
        self.file([p.grad for p in self._root_mod.parameters() if p.grad is not None and id(p) not in self._host_params],
                  Category.GRADS)
        self._in_step = True

    def _step_post_hook(self, optimizer, args, kwargs) -> None:
        self._file_optimizer_states()
        self._in_step = False

    def _file_optimizer_states(self) -> None:
        self.file([v for state in self._optm.state.values() for v in state.values() if isinstance(v, torch.Tensor)],
                  Category.HOST if self._offloaded else Category.OPTIMIZER)

    # FSDP hooks (FSDPMemTracker installs them) without per-module snapshots, which raise on the repeated
    # forwards of gradient accumulation and pipeline schedules: only the filing
    def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
        @wraps(orig_fsdp_state_pre_fw)
        def inner(*args, **kwargs):
            self._fsdp_state = _FSDPState.PRE_FW
            args, kwargs = orig_fsdp_state_pre_fw(*args, **kwargs)
            group = fsdp_mod._get_fsdp_state()._fsdp_param_group
            if group is not None:
                category = Category.PARAMS if self._gathered_is_param.get(id(group)) else Category.BUFFERS
                self.file([fp.unsharded_param for fp in group.fsdp_params], category)
            self._fsdp_state = _FSDPState.FW
            return args, kwargs
        return inner

    def _fsdp_state_post_forward(self, fsdp_mod, orig_fsdp_state_post_fw):
        @wraps(orig_fsdp_state_post_fw)
        def inner(*args, **kwargs):
            self._fsdp_state = _FSDPState.POST_FW
            return orig_fsdp_state_post_fw(*args, **kwargs)
        return inner

    def _fsdp_param_group_pre_backward(self, fsdp_mod, orig_pre_backward):
        @wraps(orig_pre_backward)
        def inner(*args, **kwargs):
            self._fsdp_state = _FSDPState.PRE_BW
            orig_pre_backward(*args, **kwargs)
            self._fsdp_state = _FSDPState.BW
        return inner

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig_post_backward):
        @wraps(orig_post_backward)
        def inner(*args, **kwargs):
            group = fsdp_mod._get_fsdp_state()._fsdp_param_group
            fsdp_params = group.fsdp_params if group else ()
            self.file([fp._unsharded_param.grad for fp in fsdp_params if fp._unsharded_param.grad is not None],
                      Category.BUFFERS)
            self._fsdp_state = _FSDPState.POST_BW
            orig_post_backward(*args, **kwargs)
            for fp in fsdp_params:
                if fp.sharded_param.grad is not None:
                    self.file(fp.sharded_param.grad, Category.HOST if fp.offload_to_cpu else Category.GRADS)
        return inner

    # -------------------------------------------------------------------------------- counting
    def __enter__(self) -> RankMemoryTracker:
        # as FSDPMemTracker.__enter__, without its ModTracker: its per-module backward hooks are not needed
        # here and break autograd.grad on inputs (the zero-bubble schedule's input-gradient step)
        if self._depth == 0:
            self._fake_mode_on_entry = active_fake_mode()
            self._register_module_and_optimizer_hooks()
            self._track_resize()
        TorchDispatchMode.__enter__(self)
        self._depth += 1
        return self

    def __exit__(self, *args) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._deregister_module_and_optimizer_hooks()
            self._restore_resize()
        TorchDispatchMode.__exit__(self, *args)

    def _update_peak_stats(self, peak_state=None) -> None:
        self.host_peak_bytes = max(self.host_peak_bytes, self.current_host_bytes())
        total = self.current_bytes()
        part = "optimizer" if self._in_step else "backward" if _in_backward() else "forward"
        label = f"{self.step_label} {part}".strip()
        best = self.phase_peaks.get(label)
        if best is None or total > best[0]:
            snapshot = {dev: dict(snap) for dev, snap in self._curr_mem_snap.items()}
            self.phase_peaks[label] = (total, snapshot, self._clock)

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        """As MemTracker's, and: when a tensor is re-filed, the peaks it was alive at (it is alive now, so:
        those after its birth) move its bytes too."""
        super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
        if u_type is _UpdateType.ADD:
            winfo.born = self._clock
        elif u_type is _UpdateType.REF:
            for _, snapshot, clock in self.phase_peaks.values():
                snap = snapshot.get(winfo.device)
                if snap is not None and clock >= getattr(winfo, "born", 0):
                    snap[old_reftype] -= winfo.mem_consumed
                    snap[winfo.reftype] += winfo.mem_consumed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE:  # a fake tensor's device, asked for all the time: answer it here (no count)
            device = getattr(args[0], "fake_device", None)
            return device if device is not None else func(*args, **kwargs)
        if any(t is DTensor for t in types):  # let DTensor run its local ops, then count those
            return NotImplemented
        if func is _SCALAR:
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:  # a fake tensor has no value
                return 1.0 if args[0].is_floating_point() else 1
        self._clock += 1
        # the fake wait_tensor returns a new tensor; the eager one returns its input
        res = args[0] if func is _WAIT and active_fake_mode() else func(*args, **kwargs)
        if active_fake_mode() is not self._fake_mode_on_entry:
            return res  # DTensor's sharding propagation under its own fake mode: no memory of this rank
        if self._as_buffers:
            category = Category.BUFFERS
        elif self._in_step and self._offloaded:  # the offloaded step's scratch is host memory
            category = Category.HOST
        elif self._in_step or _in_backward():
            category = Category.TEMPORARIES
        else:
            category = Category.ACTIVATIONS
        # FSDP's all-gather output is a buffer; ZeRO-1's optimizer step all-gathers into the parameters themselves
        if func is _c10d._allgather_base_.default and self._fsdp_state in (_FSDPState.PRE_FW, _FSDPState.PRE_BW) \
                and not self._in_step:
            self.file(args[0], Category.BUFFERS)
        if func is _c10d._reduce_scatter_base_.default and self._fsdp_state == _FSDPState.POST_BW:
            self.file(args[1], Category.BUFFERS)
        tree_map_only(torch.Tensor, partial(self._track, category), res)
        self._update_peak_stats()
        return res
