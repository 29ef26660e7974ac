"""transformers' stacked experts (`gate_up_proj` / `down_proj` [E, ...]: Mixtral, Qwen-MoE and others) in the
models.hf layout. They run their own forward on real tensors; on meta or fake tensors, where routing has no
values, they run each expert on tokens·top_k/E tokens (balanced routing, as autoplan's own MoE does), so the
profile counts the routed tokens' FLOPs and activations and the cost model adds the imbalance. Expert
parallelism runs them as autoplan's MoE runs (routed_forward -> run_experts, the same math;
executor.expert_parallel).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


def is_stacked_experts(module: nn.Module) -> bool:
    """transformers' experts modules: num_experts and stacked [E, ...] weights (down_proj and gate_up_proj
    or up_proj), called as experts(hidden [T, h], top_k_index [T, k], top_k_weights [T, k])."""
    experts = getattr(module, "num_experts", None)
    down = getattr(module, "down_proj", None)
    return isinstance(experts, int) and isinstance(down, nn.Parameter) and down.dim() == 3 and \
        down.shape[0] == experts


def _no_values(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.is_meta or is_fake(t)


def _project(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = rows @ weight if transposed else rows @ weight.t()
    return out + bias if bias is not None else out


def expert_weight_names(module: nn.Module) -> tuple[str, ...]:
    """The stacked-experts module's own parameters laid out [E, ...] (weights and biases): what expert
    parallelism shards."""
    return tuple(name for name, p in module.named_parameters(recurse=False) if p.shape[0] == module.num_experts)


def run_experts(self, grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """transformers' expert math (gate|up projection, gate, down projection) of expert e on its contiguous
    counts[e] rows of `grouped` (rows sorted by expert); the experts this module holds are len(counts)."""
    transposed = getattr(self, "is_transposed", False)
    gated = getattr(self, "has_gate", True) and hasattr(self, "gate_up_proj")
    up_weight = self.gate_up_proj if gated else self.up_proj
    up_bias = getattr(self, "gate_up_proj_bias" if gated else "up_proj_bias", None)
    down_bias = getattr(self, "down_proj_bias", None)
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        rows = grouped[start: start + count]
        start += count
        up = _project(rows, up_weight[expert], up_bias[expert] if up_bias is not None else None, transposed)
        act = self._apply_gate(up) if gated else self.act_fn(up)
        outputs.append(_project(act, self.down_proj[expert], down_bias[expert] if down_bias is not None else None,
                                transposed))
    return torch.cat(outputs) if outputs else grouped


def routed_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts' forward as autoplan's MoE runs it: token copies sorted by expert, `self.run_experts` on
    them (which expert parallelism turns into dispatch, local experts, combine), back to token order, summed
    with the routing weights. Without values (meta, fake) routing is taken as balanced: each expert gets
    tokens·top_k/E rows, the expected load."""
    tokens, hidden = hidden_states.shape
    top_k, experts = top_k_index.shape[-1], self.num_experts
    flat = top_k_index.reshape(-1)  # [T*k]
    if _no_values(hidden_states) or _no_values(top_k_index):
        base, extra = divmod(flat.numel(), experts)
        counts = [base + (e < extra) for e in range(experts)]
        grouped = hidden_states.repeat_interleave(top_k, dim=0)  # taken as sorted by expert
        return _combine(_runner(self)(grouped, counts), top_k_weights, tokens, top_k, hidden, hidden_states.dtype)
    order = flat.argsort(stable=True)
    grouped = hidden_states.repeat_interleave(top_k, dim=0)[order]  # [T*k, h] sorted by expert
    out = _runner(self)(grouped, torch.bincount(flat, minlength=experts).tolist())
    out = torch.empty_like(out).index_copy(0, order, out)  # back to token order
    return _combine(out, top_k_weights, tokens, top_k, hidden, hidden_states.dtype)


def _combine(out, weights, tokens: int, top_k: int, hidden: int, dtype) -> torch.Tensor:
    weighted = out.view(tokens, top_k, hidden) * weights.unsqueeze(-1).to(out.dtype)
    return weighted.sum(dim=1).to(dtype)


def balanced_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' own forward on real tensors; on tensors without values (meta, fake), where its routing
    would run no expert, routed_forward with balanced routing."""
    if not (_no_values(hidden_states) or _no_values(top_k_index)):
        return self._autoplan_forward(hidden_states, top_k_index, top_k_weights)
    return routed_forward(self, hidden_states, top_k_index, top_k_weights)


def _runner(module: nn.Module):
    return module.run_experts if isinstance(module, RoutedExperts) else types.MethodType(run_experts, module)


class RoutedExperts:
    """Mixed into a stacked-experts module's class by `make_routed`: run_experts, so that expert
    parallelism's class (executor.expert_parallel.ExpertParallelMixin) can put dispatch and combine around it."""

    run_experts = run_experts


def make_routed(module: nn.Module) -> None:
    """Run a stacked-experts module as routed_forward -> run_experts (in place; the same function)."""
    if not isinstance(module, RoutedExperts):
        module.__class__ = type(f"Routed{type(module).__name__}", (RoutedExperts, type(module)), {})
    module.forward = types.MethodType(routed_forward, module)


def _balance_experts(model: nn.Module) -> list[nn.Module]:
    """Route every stacked-experts module's forward through balanced_experts_forward; the modules changed."""
    changed = []
    for module in model.modules():
        if is_stacked_experts(module) and not hasattr(module, "_autoplan_forward"):
            module._autoplan_forward = module.forward
            module.forward = types.MethodType(balanced_experts_forward, module)
            changed.append(module)
    return changed


@contextlib.contextmanager
def balanced_experts(model: nn.Module):
    """balanced_experts_forward on the model's stacked experts for the duration (a user's own module is
    left as it was)."""
    changed = _balance_experts(model)
    try:
        yield
    finally:
        for module in changed:
            module.forward = module._autoplan_forward
            del module._autoplan_forward
