"""Mixed precision as the cost model counts it: bf16 parameters and gradients in the model, and an AdamW
that keeps an fp32 master copy of each parameter beside its two moments.

Per parameter (Rajbhandari et al. 2020, ZeRO, Sec. 3.1; costmodel.memory): 2 bytes bf16 parameter,
2 bytes bf16 gradient, K = 12 bytes of optimizer state (fp32 master 4, momentum 4, variance 4). The
model is cast to bf16 before the plan is applied, so tensor parallelism and FSDP shard bf16 tensors and
reduce bf16 gradients; `MasterWeightAdamW` holds the fp32 states of whatever parameters it is given
(all of them, or the local shard of an FSDP/DTensor parameter; executor.zero_one splits them over ranks).

The update runs over chunks of CHUNK_ELEMENTS, as a fused multi-tensor kernel would (Apex FusedAdam
with master weights): its temporaries are bounded by a chunk, not by the largest parameter.
"""

from __future__ import annotations

import math

import torch

MIXED_PRECISION_DTYPE = torch.bfloat16
HOST = torch.device("cpu")  # where an offloaded optimizer keeps its states (Plan.offload; costmodel.offload)
# 2**22 elements: the fp32 gradient copy and denominator of one chunk are 16 MiB each.
CHUNK_ELEMENTS = 2**22


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own storage of a (DTensor) parameter or gradient."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019, Alg. 2) on fp32 master weights of low-precision parameters.

    state[p]: step (python int), master, exp_avg, exp_avg_sq (fp32, shaped as p's local tensor).
    After each update the master is rounded into p. Ignores amsgrad and gradient scaling.
    offload: the states live in host memory and the update runs on the CPU (ZeRO-Offload, Ren et al. 2021,
    Sec. 4.1): each chunk's gradient goes down, the updated parameter chunk comes back up in p's dtype.
    """

    def __init__(self, params, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, offload: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.offloaded = offload  # the memory tracker files the states (and the step's scratch) as host memory

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
                    self._after_update(param)
        return loss

    def _after_update(self, param: torch.Tensor) -> None:
        """What a subclass does with `param` once updated (executor.zero_one gathers its chunks)."""

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        weight = _local(param)
        if not state:
            state["step"] = 0
            state["master"] = weight.detach().to(HOST if self.offloaded else weight.device, torch.float32, copy=True)
            state["exp_avg"] = torch.zeros_like(state["master"])
            state["exp_avg_sq"] = torch.zeros_like(state["master"])
        state["step"] += 1
        adamw_update(weight, local_grad(param), state["master"], state["exp_avg"], state["exp_avg_sq"],
                     step=state["step"], group=group)


def local_grad(param: torch.Tensor) -> torch.Tensor:
    """The rank's own part of param's gradient, laid out as the parameter (a vocabulary-parallel embedding's
    gradient comes back Replicate: its shard is taken)."""
    grad = param.grad
    if hasattr(grad, "placements") and grad.placements != param.placements:
        grad = grad.redistribute(param.device_mesh, param.placements)
    return _local(grad)


def adamw_update(weight: torch.Tensor, grad: torch.Tensor, master: torch.Tensor | None, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, *, step: int, group: dict) -> None:
    """One AdamW update (torch.optim.AdamW's arithmetic, foreach=False) of `weight` in place, over chunks of
    CHUNK_ELEMENTS; with `master` (fp32) the update is made there and rounded into `weight`, without it
    `weight` is itself fp32 and updated directly. All tensors have `weight`'s number of elements. The states
    may live elsewhere than `weight` (offloaded to the host): the update runs where they are, the gradient
    chunk is copied there and the updated chunk copied back in `weight`'s dtype."""
    beta1, beta2 = group["betas"]
    lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
    step_size = lr / (1 - beta1 ** step)
    bias2_sqrt = math.sqrt(1 - beta2 ** step)
    target = weight if master is None else master
    for w, g, t, m, v in zip(*(x.view(-1).split(CHUNK_ELEMENTS) for x in (weight, grad, target, exp_avg, exp_avg_sq))):
        g32 = g.to(m.device, torch.float32)
        m.lerp_(g32, 1 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        denom = v.sqrt().div_(bias2_sqrt).add_(eps)
        t.mul_(1 - lr * decay).addcdiv_(m, denom, value=-step_size)
        if master is not None:
            w.copy_(t if t.device == w.device else t.to(w.dtype))
