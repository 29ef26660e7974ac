"""Fine-tuning: which parameters train. `apply_trainable` freezes every parameter whose name a pattern does
not match (`--trainable`); `add_lora` puts low-rank adapters beside chosen linear layers and freezes the rest
(Hu et al. 2021, LoRA, Sec. 4: W x + (alpha/r) B A x, A Gaussian, B zero), for a model.py that plans LoRA
without peft (examples/lora_llama3_8b.py). The profile, the cost model, the executor and the dry run all
read requires_grad: a frozen parameter has no gradient, no optimizer state and no data-parallel traffic.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from autoplan.errors import InvalidInputError

DEFAULT_LORA_TARGETS = ("wq", "wk", "wv", "wo")


def apply_trainable(model: nn.Module, pattern: str | None) -> nn.Module:
    """Parameters whose name matches the regular expression `pattern` (re.search) train, all others are
    frozen; None leaves the model as it is. A pattern that is not a regular expression, or that matches no
    parameter, is an InvalidInputError."""
    if pattern is None:
        return model
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise InvalidInputError(f"--trainable {pattern!r} is not a regular expression: {err}") from None
    names = [name for name, _ in model.named_parameters()]
    if not any(regex.search(name) for name in names):
        example = ", ".join(names[:3])
        raise InvalidInputError(f"--trainable {pattern!r} matches none of the model's parameters (e.g. {example})")
    for name, param in model.named_parameters():
        param.requires_grad_(bool(regex.search(name)))
    return model


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) · B(A(x)): `base` frozen, A [r, in] and B [out, r] training (B starts at zero,
    so the adapted model starts as the base model)."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.scale = alpha / rank
        self.reset_adapters()

    def reset_adapters(self) -> None:
        if self.lora_a.weight.is_meta:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


def add_lora(model: nn.Module, *, rank: int = 16, alpha: float = 32.0,
             targets: tuple[str, ...] = DEFAULT_LORA_TARGETS) -> nn.Module:
    """Freeze `model` and wrap each nn.Linear whose attribute name is in `targets` with a LoRALinear."""
    if rank < 1:
        raise InvalidInputError(f"LoRA rank must be positive, got {rank}")
    model.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank=rank, alpha=alpha))
                wrapped += 1
    if not wrapped:
        raise InvalidInputError(f"no nn.Linear named {', '.join(targets)} in the model: nothing to adapt")
    return model
