"""A model's blocks timed on real tensors: forward and backward seconds per micro-batch size, the bytes
autograd saves, the peak on CUDA, and the host's issue time per recompute mode (profiler.host)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autoplan.profiler.timing import Progress, no_progress, sample_s, stats


def measure_layers(model: str, *, device: torch.device | str, dtype: torch.dtype, micro_batch_sizes: Sequence[int],
                   repeats: int, progress: Progress = no_progress, host: dict | None = None) -> list[dict]:
    """Forward and backward seconds of each block of `model` (a built-in name or a model.py whose blocks are
    `model.layers`) on real tensors, per micro-batch size; activation memory as the bytes autograd saves
    (saved_tensors_hooks, deduplicated by storage, parameters excluded) and, on CUDA, the peak allocated
    during one forward + backward (torch.cuda.max_memory_allocated above what was allocated before).
    `host` (a dict, CUDA only): filled with the host's issue time of the first block per recompute mode
    (profiler.host)."""
    from autoplan.errors import InvalidInputError
    from autoplan.models import load_model

    device = torch.device(device)
    loaded = load_model(model, device=device)
    module = loaded.module
    if hasattr(module, "init_weights"):
        module.init_weights(0)
    module.to(dtype)
    blocks = getattr(module, "layers", None)
    if not isinstance(blocks, (torch.nn.ModuleDict, torch.nn.ModuleList)):
        raise InvalidInputError(f"{model}: measuring layers needs the model's blocks in `.layers` "
                                "(a ModuleDict or ModuleList)")
    named = list(blocks.items()) if isinstance(blocks, torch.nn.ModuleDict) else list(enumerate(blocks))
    seq_len, vocab = loaded.seq_len or 128, loaded.config.get("vocab", 2)
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    entries = []
    for mbs in micro_batch_sizes:
        tokens = torch.randint(0, vocab, (mbs, seq_len), device=device)
        inputs = block_inputs(module, [block for _, block in named], tokens)
        for (name, block), (args, kwargs) in zip(named, inputs):
            timed = _time_block(block, args, kwargs, device=device, repeats=repeats, param_storages=param_storages)
            entries.append({"model": loaded.name, "layer": f"layers.{name}", "micro_batch_size": mbs,
                            "seq_len": seq_len, "dtype": str(dtype).removeprefix("torch."), **timed})
        progress(f"{loaded.name} blocks, micro-batch {mbs}")
    if host is not None and device.type == "cuda" and named:
        from autoplan.profiler.host import measure_host_blocks

        host.update(model=loaded.name, **measure_host_blocks(module, named[0][1], vocab=vocab, device=device,
                                                             repeats=repeats, block_inputs=block_inputs))
    return entries


def block_inputs(module: torch.nn.Module, blocks: list, tokens: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each block receives in one no-grad forward of the whole model."""
    captured: list[tuple[tuple, dict]] = []
    hooks = [block.register_forward_pre_hook(lambda _, args, kwargs: captured.append((args, kwargs)),
                                             with_kwargs=True) for block in blocks]
    try:
        with torch.no_grad():
            module(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _time_block(block, args, kwargs, *, device, repeats: int, param_storages: set) -> dict:
    def leaf(x):
        return x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    fwd_s, bwd_s, peak_bytes, result = [], [], None, {}
    for i in range(1 + repeats):  # the first pass is a warm-up that also counts saved bytes and the peak
        a, kw = [leaf(x) for x in args], {k: leaf(v) for k, v in kwargs.items()}
        if device.type == "cuda" and i == 0:
            torch.cuda.reset_peak_memory_stats(device)
            allocated_bytes = torch.cuda.memory_allocated(device)
        with torch.autograd.graph.saved_tensors_hooks(pack if i == 0 else (lambda t: t), lambda t: t):
            f = sample_s(lambda: result.update(out=block(*a, **kw)), device=device)
        out = result.pop("out")
        out = out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))
        b = sample_s(lambda: out.backward(torch.ones_like(out)), device=device)
        if i == 0 and device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated(device) - allocated_bytes
        elif i > 0:
            fwd_s.append(f), bwd_s.append(b)
        del out
    fwd, bwd = stats(fwd_s), stats(bwd_s)
    return {"fwd_median_s": fwd["median_s"], "fwd_spread": fwd["spread"], "bwd_median_s": bwd["median_s"],
            "bwd_spread": bwd["spread"], "repeats": repeats, "saved_activation_bytes": sum(saved.values()),
            "peak_bytes": peak_bytes}
