"""model.py or a built-in name -> ModelProfile, by tracing on the meta device (no memory, any size).

Steps:
1. one forward pass with no grad on meta records, in execution order, the top-level units (children of
   the model, with ModuleList/ModuleDict items as the blocks) and the arguments each was called with;
2. each unit is traced forward and backward (profiler.trace); a block is split into sub-layers at its
   norms (pre-norm + attention, pre-norm + feed-forward), each child traced with the arguments it got;
   blocks with identical structure (class, parameter shapes) are traced once and the result reused;
3. the units become LayerProfiles in forward order, costs per sequence.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from autoplan.models.finetune import apply_trainable
from autoplan.errors import InvalidInputError, first_line
from autoplan.models.hf import wrap_hf_model
from autoplan.models.hf_experts import balanced_experts, is_stacked_experts
from autoplan.models.loader import LoadedModel, load_model, seq_len_overrides
from autoplan.profiler.trace import TraceResult, trace, trace_layer
from autoplan.schema import GemmShape, LayerProfile, ModelProfile

_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d)


@dataclass
class _Call:
    module: nn.Module
    name: str
    args: tuple
    kwargs: dict
    in_container: bool
    children: list[_Call] = field(default_factory=list)


def module_kind(name: str, module: nn.Module) -> str:
    """embedding, attention, mlp, moe, norm, head or other, from the module's type, name and structure."""
    label = (type(module).__name__ + " " + name.rsplit(".", 1)[-1]).lower()
    if isinstance(module, _NORM_TYPES) or "norm" in label:
        return "norm"
    if "rotary" in label or "rope" in label:
        return "other"
    if isinstance(module, nn.Embedding) or "embed" in label:
        return "embedding"
    if "attn" in label or "attention" in label:
        return "attention"
    if _holds_experts(module) or "moe" in label or "expert" in label:
        return "moe"
    if any(word in label for word in ("mlp", "ffn", "feed_forward", "feedforward", "swiglu")):
        return "mlp"
    return "other"


def _holds_experts(module: nn.Module) -> bool:
    return any(isinstance(getattr(sub, "num_experts", None), int) or is_stacked_experts(sub)
               for sub in module.modules())


def _attr(module: nn.Module, *names: str) -> int:
    """The first int attribute of `names` on the module, else on its config (transformers' modules keep
    heads and experts there)."""
    for owner in (module, getattr(module, "config", None)):
        for name in names:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return 0


def _signature(module: nn.Module) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    return type(module).__name__, params, tuple(type(m).__name__ for m in module.modules())


def _capture_calls(model: nn.Module, tokens: torch.Tensor) -> list[_Call]:
    """Run the model once (no grad) and record the top-level units and block children as called."""
    calls: list[_Call] = []
    by_module: dict[int, _Call] = {}
    handles = []

    def unit_hook(name: str, in_container: bool):
        def hook(mod, args, kwargs):
            if id(mod) not in by_module:
                by_module[id(mod)] = _Call(mod, name, args, kwargs, in_container)
                calls.append(by_module[id(mod)])
        return hook

    def child_hook(parent: nn.Module, name: str):
        def hook(mod, args, kwargs):
            parent_call = by_module.get(id(parent))
            if parent_call is not None and all(c.module is not mod for c in parent_call.children):
                parent_call.children.append(_Call(mod, name, args, kwargs, False))
        return hook

    def watch(name: str, module: nn.Module, in_container: bool) -> None:
        handles.append(module.register_forward_pre_hook(unit_hook(name, in_container), with_kwargs=True))
        if in_container:
            for child_name, child in module.named_children():
                handles.append(child.register_forward_pre_hook(child_hook(module, f"{name}.{child_name}"),
                                                               with_kwargs=True))

    def visit(prefix: str, module: nn.Module) -> None:  # blocks wherever nested (transformers: model.layers)
        for name, child in module.named_children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and (not prefix or _is_block_stack(child)):
                for item_name, item in child.named_children():
                    watch(f"{prefix}{name}.{item_name}", item, True)
            elif any(_is_block_stack(m) for m in child.modules()):
                visit(f"{prefix}{name}.", child)
            else:
                watch(f"{prefix}{name}", child, False)

    visit("", model)
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _is_block_stack(module: nn.Module) -> bool:
    """A ModuleList/ModuleDict of blocks: the model's own top-level one, or one of two or more modules of a
    class nested deeper."""
    items = list(module.children())
    return isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(items) >= 2 and \
        len({type(item) for item in items}) == 1


def _parts(block: _Call) -> list[list[_Call]]:
    """Split a block's children at its norms: [norm, attention], [norm, feed-forward], ..."""
    parts: list[list[_Call]] = []
    for child in block.children:
        if not parts or any(module_kind(c.name, c.module) != "norm" for c in parts[-1]):
            parts.append([child])
        else:
            parts[-1].append(child)
    return parts


def _is_token_table(module: nn.Module, owner: str, vocab: int) -> bool:
    sub = module.get_submodule(owner) if owner else module
    return isinstance(sub, nn.Embedding) and sub.num_embeddings == vocab


def _layer(name: str, kind: str, block: int | None, modules: list[nn.Module],
           results: list[TraceResult], vocab: int, owned: set[int] | None = None) -> LayerProfile:
    """Sum traced children into one LayerProfile; shape facts come from the modules themselves."""
    gemms: OrderedDict[tuple, int] = OrderedDict()
    for r in results:
        for g in r.gemms:
            key = (g.m, g.n, g.k, g.tp_split)
            gemms[key] = gemms.get(key, 0) + 1
    params = tp_params = expert_params = tied = frozen = 0
    heads = kv_heads = experts = top_k = 0
    owned = set() if owned is None else owned  # parameters an earlier layer holds (tied weights): counted there
    for module, result in zip(modules, results):
        for pname, p in module.named_parameters():
            owner, _, leaf = pname.rpartition(".")
            split = result.linear_splits.get(owner)
            if id(p) in owned:
                tied += p.numel()
                continue
            owned.add(id(p))
            params += p.numel()
            frozen += 0 if p.requires_grad else p.numel()
            if split is None and kind == "moe" and p.dim() == 3:
                expert_params += p.numel()  # stacked expert weights [experts, ...]: split by ep
            elif split == "n" or (split == "k" and leaf != "bias"):
                tp_params += p.numel()  # column-parallel weight and bias, row-parallel weight
            elif split is None and _is_token_table(module, owner, vocab):
                tp_params += p.numel()  # vocab-parallel embedding table (positions stay whole)
        for sub in module.modules():
            heads = heads or _attr(sub, "heads", "num_heads", "n_heads", "num_attention_heads")
            kv_heads = kv_heads or _attr(sub, "kv_heads", "num_kv_heads", "n_kv_heads", "num_key_value_heads")
            experts = experts or _attr(sub, "num_experts", "n_experts", "num_local_experts")
            top_k = top_k or _attr(sub, "top_k", "num_experts_per_tok")
    # peaks of the modules run one after another: forward in order, backward in reverse, each module's
    # transient on top of what the modules before it (forward) keep / the ones after it (backward) have freed
    saved = [r.activation_bytes for r in results]
    forward_peak = max(r.forward_peak_bytes - sum(saved[i + 1:]) for i, r in enumerate(results))
    backward_peak = max(r.backward_peak_bytes - sum(saved[i + 1:]) for i, r in enumerate(results))
    backward_weight = max(r.backward_peak_weight_bytes for r in results)
    row_parallel = sum(split == "k" for r in results for split in r.linear_splits.values())
    tp_collectives = max(row_parallel, 1) if kind in ("embedding", "head", "moe") else row_parallel
    return LayerProfile(
        name=name, kind=kind, block=block, tp_collectives=tp_collectives,
        fwd_flops=sum(r.fwd_flops for r in results), bwd_flops=sum(r.bwd_flops for r in results),
        attention_core_fwd_flops=sum(r.attention_core_fwd_flops for r in results),
        attention_kv_bytes=sum(r.attention_kv_bytes for r in results),
        params=params, tp_sharded_params=tp_params, expert_params=expert_params, tied_params=tied, frozen_params=frozen,
        activation_bytes=sum(r.activation_bytes for r in results),
        activation_tp_sharded_bytes=sum(r.activation_tp_sharded_bytes for r in results),
        attention_score_bytes=sum(r.attention_score_bytes for r in results),
        activation_column_input_bytes=sum(r.activation_column_input_bytes for r in results),
        selective_bytes=sum(r.selective_bytes for r in results),
        selective_tp_sharded_bytes=sum(r.selective_tp_sharded_bytes for r in results),
        forward_peak_bytes=max(forward_peak, 0), backward_peak_bytes=max(backward_peak, 0),
        backward_peak_weight_bytes=backward_weight,
        output_bytes=results[-1].output_bytes,
        memory_bound_bytes=sum(r.memory_bound_bytes for r in results),
        streaming_bytes=sum(r.streaming_bytes for r in results),
        memory_bound_tp_sharded_bytes=sum(r.memory_bound_tp_sharded_bytes for r in results),
        memory_bound_bwd_bytes=sum(r.memory_bound_bwd_bytes for r in results),
        memory_bound_bwd_tp_sharded_bytes=sum(r.memory_bound_bwd_tp_sharded_bytes for r in results),
        streaming_bwd_bytes=sum(r.streaming_bwd_bytes for r in results),
        gemms=[GemmShape(m_per_sequence=m, n=n, k=k, count=c, tp_split=s) for (m, n, k, s), c in gemms.items()],
        num_heads=heads if kind == "attention" else 0, num_kv_heads=(kv_heads or heads) if kind == "attention" else 0,
        num_experts=experts if kind == "moe" else 0, top_k=top_k if kind == "moe" else 0,
    )


def _block_layers(block: _Call, index: int, vocab: int, flash: bool, owned: set[int]) -> list[LayerProfile]:
    whole = trace(block.module, block.args, block.kwargs, vocab_size=vocab, flash=flash)
    layers = []
    parts_owned = set(owned)  # (the parameters the parts count, kept only if the block is split into them)
    for part in _parts(block):
        main = next((c for c in part if module_kind(c.name, c.module) != "norm"), part[-1])
        results = [trace_layer(c.module, c.args, c.kwargs, vocab_size=vocab, flash=flash) for c in part]
        kind = module_kind(main.name, main.module)
        layers.append(_layer(main.name, kind, index, [c.module for c in part], results, vocab, parts_owned))
    parts_flops = sum(layer.fwd_flops for layer in layers)
    if layers:  # what selective recompute keeps of the ops between the parts (the residual adds)
        between = whole.selective_bytes - sum(layer.selective_bytes for layer in layers)
        layers[-1] = layers[-1].model_copy(update={"selective_bytes": layers[-1].selective_bytes + max(between, 0)})
    if not layers or abs(parts_flops - whole.fwd_flops) > 0.01 * max(whole.fwd_flops, 1.0):
        # work happens outside the children (or no children): keep the block as one layer
        kinds = {module_kind(n, m) for n, m in block.module.named_children()} - {"norm"}
        kind = "moe" if "moe" in kinds else ("attention" if "attention" in kinds else "other")
        return [_layer(block.name, kind, index, [block.module], [whole], vocab, owned)]
    owned |= parts_owned
    return layers


def _vocab_size(model: nn.Module) -> int:
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0].num_embeddings if embeddings else 0


MAX_SEQ_LEN = 2**24  # tokens per sequence; beyond any model trained today


def profile_model(model: nn.Module | str | LoadedModel, *, seq_len: int | None = None, name: str | None = None,
                  dtype: torch.dtype = torch.bfloat16, attention: str = "flash",
                  trainable: str | None = None) -> ModelProfile:
    """Trace a model (module, model.py path or built-in name) on meta into a ModelProfile.

    Costs are per sequence (micro-batch 1) at `seq_len` tokens, in `dtype` (bf16 mixed precision by
    default). attention="flash" traces F.scaled_dot_product_attention as a fused kernel; "eager" keeps
    whatever the model does (explicit softmax attention saves its seq x seq matrices).
    trainable: a regular expression; only parameters whose name it matches train (models.finetune), the
    others are frozen, as are those the model itself built with requires_grad=False.
    """
    if attention not in ("flash", "eager"):
        raise InvalidInputError(f"attention must be flash or eager, not {attention!r}")
    if isinstance(model, (str, Path)):
        spec = str(model)
        overrides = seq_len_overrides(spec, seq_len)
        model = load_model(spec, device="meta", **overrides)
    if isinstance(model, LoadedModel):
        name = name or model.name
        seq_len = seq_len or model.seq_len
        model = model.module
    model = wrap_hf_model(model, seq_len=seq_len)
    apply_trainable(model, trainable)
    config = getattr(model, "config", None)
    seq_len = seq_len or getattr(config, "seq_len", None)
    if not seq_len:
        raise InvalidInputError("seq_len is unknown: pass seq_len=... (or --seq-len), or set CONFIG['seq_len']")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= MAX_SEQ_LEN:
        raise InvalidInputError(f"seq_len must be a whole number between 1 and {MAX_SEQ_LEN:,}, got {seq_len!r}")
    if any(not p.is_meta for p in model.parameters()):
        raise InvalidInputError("profile_model traces on the meta device: build the model under "
                                "`with torch.device('meta'):` (or pass a model.py path or a built-in name)")
    original = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    model.to(dtype)
    name = name or type(model).__name__
    try:
        with balanced_experts(model), _no_kv_cache(model):
            return _profile(model, seq_len, name, dtype, attention == "flash")
    except InvalidInputError:
        raise
    except Exception as err:  # the model's own code failed on meta tensors: say where, in one line
        raise InvalidInputError(f"{name}: tracing at seq_len={seq_len} on the meta device failed: "
                                f"{first_line(err)}") from None
    finally:
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            t.data = t.data.to(original[n])


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """A transformers model traced as training runs it: no key/value cache (which would carry one traced
    call's keys into the next)."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if isinstance(cached, bool):
        config.use_cache = False
    try:
        yield
    finally:
        if isinstance(cached, bool):
            config.use_cache = cached


def _profile(model: nn.Module, seq_len: int, name: str, dtype: torch.dtype, flash: bool) -> ModelProfile:
    vocab = _vocab_size(model)
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    calls = _capture_calls(model, tokens)
    layers: list[LayerProfile] = []
    traced_blocks: dict[tuple, list[LayerProfile]] = {}
    owned: set[int] = set()  # parameters already counted (a tied weight is counted by its first layer)
    num_blocks = 0
    for call in calls:
        if call.in_container:
            signature = _signature(call.module)
            if signature not in traced_blocks:
                traced_blocks[signature] = _block_layers(call, num_blocks, vocab, flash, owned)
            for template in traced_blocks[signature]:
                suffix = template.name.split(".", 2)[-1] if template.name.count(".") >= 2 else ""
                layer_name = f"{call.name}.{suffix}" if suffix else call.name
                layers.append(template.model_copy(update={"name": layer_name, "block": num_blocks}))
            num_blocks += 1
            continue
        result = trace_layer(call.module, call.args, call.kwargs, vocab_size=vocab, flash=flash)
        if not any(True for _ in call.module.parameters()) and not result.fwd_flops and not result.activation_bytes:
            continue  # nothing to cost (rotary tables, a mask maker)
        kind = module_kind(call.name, call.module)
        is_head = isinstance(call.module, nn.Linear) and vocab and call.module.out_features == vocab
        layers.append(_layer(call.name, "head" if is_head else kind, None, [call.module], [result], vocab, owned))
    if not layers:
        raise InvalidInputError(f"{name}: the model ran no submodules; autoplan needs a model built from modules")
    attn = next((layer for layer in layers if layer.kind == "attention"), None)
    moe = next((layer for layer in layers if layer.kind == "moe"), None)
    hidden = _hidden_size(model, layers)
    own = getattr(model, "notes", None)  # what a layout (autoplan.models.hf) knows it may do differently
    notes = (list(own) if isinstance(own, list) else []) + \
        _unrecognized(layers, num_blocks, sum(p.numel() for p in model.parameters()))
    return ModelProfile(notes=notes,
        name=name, seq_len=seq_len, dtype=str(dtype).removeprefix("torch."),
        dtype_bytes=torch.empty((), dtype=dtype).element_size(), hidden=hidden, vocab_size=vocab,
        num_blocks=num_blocks or 1, num_heads=attn.num_heads if attn else 0,
        num_kv_heads=attn.num_kv_heads if attn else 0, num_experts=moe.num_experts if moe else 0,
        top_k=moe.top_k if moe else 0, attention="flash" if flash else "eager", layers=layers,
    )


def _unrecognized(layers: list[LayerProfile], num_blocks: int, model_params: int) -> list[str]:
    """One line for each thing the profile could not find, so no number rests on a silent guess."""
    notes = []
    if not num_blocks:
        notes.append("no repeated blocks found (a ModuleList/ModuleDict of blocks): the model is costed as "
                     f"{len(layers)} opaque layer(s) and pipeline parallelism cannot split it")
    if any(layer.kind == "attention" and not layer.num_heads for layer in layers):
        notes.append("attention heads not found on the attention modules or their config (heads, num_heads, "
                     "num_attention_heads): tp is not checked against them")
    if any(layer.kind == "moe" and not (layer.num_experts and layer.top_k) for layer in layers):
        notes.append("a moe layer without num_experts / top_k found: its expert parallelism is not costed")
    for layer in layers:
        if layer.tied_params:
            notes.append(f"{layer.name} uses {layer.tied_params:,} parameters tied to an earlier layer's, counted "
                         f"once; with pp > 1 the last pipeline stage keeps a copy of its own")
    counted = sum(layer.params for layer in layers)
    if counted != model_params:
        notes.append(f"{model_params - counted:,} of the model's {model_params:,} parameters were not run by the "
                     f"traced forward (unused modules?) and are not costed")
    return notes


def _hidden_size(model: nn.Module, layers: list[LayerProfile]) -> int:
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        return embeddings[0].embedding_dim
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden", 0) or getattr(config, "hidden_size", 0) or 0)


def timed_profile(*args, **kwargs) -> tuple[ModelProfile, float]:
    start = time.perf_counter()
    profile = profile_model(*args, **kwargs)
    return profile, time.perf_counter() - start
