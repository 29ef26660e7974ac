"""torchtitan's models (`pip install torchtitan`) are not read: a torchtitan module handed to the profiler,
the dry run or the executor is refused in one line (TORCHTITAN), instead of failing inside its attention.

Why (torchtitan 0.3.0 on torch 2.13.0+cpu, tried on its llama3 "debugmodel"): its language models run
attention through one of three backends, none of which autoplan can trace on the meta device or train on
CPU, and 0.3.0 removed the SDPA backend for language models (`get_attention_config("sdpa")` raises
"sdpa is no longer supported for language models"):
- flex: the BlockMask is built by a compiled `create_block_mask` (inductor fails on meta tensors;
  33 s on CPU for s=64), and FlexAttention has no backward on CPU;
- flex_flash: Hopper or Blackwell GPUs only;
- varlen: the CUDA flash kernel (`aten::_flash_attention_forward` has no CPU kernel), and on meta its
  metadata needs `torch.nonzero` (data-dependent).
Installing it: `import torchtitan.models.llama3` needs triton (torchtitan.distributed.minimal_async_ep
imports it unconditionally), which neither torchtitan nor a CPU build of torch requires; and its pin
datasets<4.8 (datasets 4.7.0: huggingface-hub<2, fsspec<=2026.2.0) downgrades huggingface-hub 2.4.0 and
fsspec 2026.9.0 of this project's venv. A torchtitan model's shape can be planned through the built-in
`llama3-8b`/`-70b`/`-405b` (the same layers) or a Hugging Face config of that shape.
"""

from __future__ import annotations

from torch import nn

from autoplan.errors import ModelLoadError

TORCHTITAN = ("{model} is a torchtitan {version} model, which autoplan does not read: none of its attention "
              "backends traces on the meta device or trains on CPU (flex: an inductor-compiled BlockMask and no "
              "CPU backward; flex_flash: Hopper/Blackwell; varlen: CUDA flash kernels) and torchtitan removed "
              "sdpa for language models; plan it as the built-in model or a Hugging Face config of its shape")


def is_torchtitan_model(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torchtitan.")


def refuse_torchtitan(module: nn.Module) -> None:
    """ModelLoadError (one line, TORCHTITAN) for a torchtitan model; nothing for any other module."""
    if not is_torchtitan_model(module):
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        titan = version("torchtitan")
    except PackageNotFoundError:
        titan = "(unknown version)"
    raise ModelLoadError(TORCHTITAN.format(model=type(module).__name__, version=titan))
