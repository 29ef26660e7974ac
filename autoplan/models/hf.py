"""Hugging Face causal language models (a config.json or a local model folder), built with transformers on
any device (meta for planning) without downloading anything, and presented in the reference models' layout.

`HFCausalLM` holds transformers' own modules, unchanged but for GPT-2's Conv1D (an nn.Linear with the
transposed weight: the same function, which tensor parallelism and the profiler's GEMM tracking know):
    embed  (token table [+ learned positions] [+ dropout])  ->  layers (the decoder blocks, "0".."L-1")
    ->  norm  ->  output (lm_head; tied to the token table where the config ties them)
and runs them as the HF model does for training without padding: positions 0..s-1 (under context
parallelism the global positions of the rank's sequence chunks), the rotary tables computed once per
forward, causal attention through F.scaled_dot_product_attention (`is_causal`, no mask tensor, so nothing
reads values on the meta device). That is what the profiler, the pipeline split, tensor
parallelism and the dry run rely on. What this layout cannot find in a model is refused in one line.

Stacked experts (transformers' `gate_up_proj` / `down_proj` [E, ...]: Mixtral, Qwen-MoE and others) run as
models.hf_experts describes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from autoplan.errors import ModelLoadError, first_line
from autoplan.models.hf_experts import _balance_experts

DEFAULT_MAX_SEQ_LEN = 4096  # the sequence length planned for when neither --seq-len nor a smaller config limit says


@dataclass(frozen=True)
class HFShape:
    """What autoplan reads of a model's config (seq_len, vocab, hidden); `hf` is transformers' config."""

    seq_len: int
    vocab: int
    hidden: int
    hf: object = field(default=None, compare=False, repr=False)


def is_hf_spec(spec: str) -> bool:
    """A config.json file, or a folder holding one."""
    path = Path(spec)
    return (path.suffix == ".json" and path.is_file()) or (path.is_dir() and (path / "config.json").is_file())


def hf_config(spec: str):
    """transformers' config from a config.json path or a local model folder (never from the Hub)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ModelLoadError(f"{spec} is a Hugging Face config: install the extra `pip install autoplan[hf]` "
                             f"(transformers)") from None
    path = Path(spec)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    except KeyError:
        raise ModelLoadError(f"{file} has no model_type: not a Hugging Face model config") from None
    except Exception as err:
        raise ModelLoadError(f"{file}: {first_line(err)}") from None


def load_hf(spec: str, *, device: str | torch.device = "meta", seq_len: int | None = None):
    """(HFCausalLM on `device`, config dict with seq_len, vocab and hidden) for a config.json or folder."""
    from transformers import AutoModelForCausalLM

    config = hf_config(spec)
    config._attn_implementation = "sdpa"  # causal attention without a mask tensor (see the module docstring)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except Exception as err:
        raise ModelLoadError(f"{spec}: transformers could not build a causal LM from it: {first_line(err)}") from None
    wrapped = HFCausalLM(model, seq_len=seq_len, name=spec)
    shape = wrapped.config
    return wrapped, {"seq_len": shape.seq_len, "vocab": shape.vocab, "hidden": shape.hidden}


def is_hf_model(module: nn.Module) -> bool:
    """A transformers causal LM as transformers builds it (not yet laid out by HFCausalLM)."""
    return type(module).__module__.startswith("transformers.") and \
        callable(getattr(module, "get_output_embeddings", None)) and hasattr(module, "config")


def wrap_hf_model(module: nn.Module, *, seq_len: int | None = None) -> nn.Module:
    """A transformers causal LM built on meta (a copy, so the user's object stays as it was) as HFCausalLM;
    any other module as it is (a torchtitan model is refused in one line: autoplan.models.titan). Its own
    forward is not traced: transformers' mask code reads tensor values (`.item()`), which meta tensors do
    not have."""
    from autoplan.models.titan import refuse_torchtitan

    refuse_torchtitan(module)
    if not is_hf_model(module):
        return module
    if any(not p.is_meta for p in module.parameters()):
        return module  # the caller refuses it (meta only)
    return HFCausalLM(copy.deepcopy(module), seq_len=seq_len, name=type(module).__name__)


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D (y = x @ W + b, W [in, out]) as the nn.Linear computing the same (weight W^T)."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with torch.no_grad():
        if not conv.weight.is_meta:
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
    return linear


def _replace_conv1d(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv1D" and getattr(child, "weight", None) is not None:
                setattr(parent, name, _conv1d_as_linear(child))


class HFEmbedding(nn.Module):
    """Token table, learned positions (GPT-2's wpe) where the model has them, and the embedding dropout."""

    def __init__(self, tok: nn.Embedding, pos: nn.Embedding | None = None, dropout: nn.Module | None = None,
                 scale: float | None = None):
        super().__init__()
        self.tok, self.pos, self.dropout = tok, pos, dropout
        self.scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)  # [b, s, h]
        if self.scale is not None:
            x = x * self.scale
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.dropout(x) if self.dropout is not None else x


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _block_stack(base: nn.Module, layers: int) -> tuple[str, nn.ModuleList]:
    stacks = [(name, child) for name, child in base.named_children()
              if isinstance(child, nn.ModuleList) and len(child) == layers]
    if len(stacks) != 1:
        raise ModelLoadError(f"{type(base).__name__}: found {len(stacks)} lists of {layers} blocks (num_hidden_layers) "
                             f"among its children; autoplan needs exactly one")
    return stacks[0]


def _child(base: nn.Module, names: tuple[str, ...], what: str, required: bool = True) -> nn.Module | None:
    for name in names:
        child = getattr(base, name, None)
        if isinstance(child, nn.Module):
            return child
    if required:
        raise ModelLoadError(f"{type(base).__name__}: no {what} found (looked for {', '.join(names)})")
    return None


class HFCausalLM(nn.Module):
    """tokens [b, s] (int64) -> logits [b, s, vocab] through a transformers causal LM's own modules, laid out
    as embed -> layers -> norm -> output (module docstring). Pipeline stages may hold None parts."""

    is_foreign = True  # the executor refuses what it cannot do with it (autoplan.support.unsupported_reason)
    sequence_shards = 1  # set to tp by tensor parallelism with sequence parallelism
    global_positions: torch.Tensor | None = None  # [s/cp]: this rank's positions, set while context parallelism
    #                                               runs a micro-batch (executor.context_parallel); else 0..s-1

    def __init__(self, model: nn.Module, *, seq_len: int | None = None, name: str = ""):
        super().__init__()
        hf = model.config
        text = getattr(hf, "get_text_config", lambda: hf)()
        base = _base_model(model)
        layers = int(getattr(text, "num_hidden_layers", 0) or 0)
        stack_name, stack = _block_stack(base, layers)
        tok = model.get_input_embeddings()
        output = model.get_output_embeddings()
        if not isinstance(tok, nn.Embedding) or not isinstance(output, nn.Module):
            raise ModelLoadError(f"{name or type(model).__name__}: no token embedding or output head found")
        pos = getattr(base, "wpe", None)
        dropout = getattr(base, "drop", None) or getattr(base, "dropout", None)
        scale = getattr(base, "embed_scale", None)
        self.embed = HFEmbedding(tok, pos if isinstance(pos, nn.Embedding) else None,
                                 dropout if isinstance(dropout, nn.Dropout) else None,
                                 float(scale) if isinstance(scale, (int, float)) and scale != 1 else None)
        self.layers = nn.ModuleDict({str(i): block for i, block in enumerate(stack)})
        self.norm = _child(base, ("norm", "ln_f", "final_layernorm", "final_layer_norm"), "final norm")
        self.output = output
        self.rotary = _child(base, ("rotary_emb",), "rotary embedding", required=False)
        self.positions_found = self.rotary is not None or self.embed.pos is not None  # what cp can place
        _replace_conv1d(self)
        if getattr(text, "tie_word_embeddings", False):
            self.output.weight = self.embed.tok.weight
        _balance_experts(self)
        limit = int(getattr(text, "max_position_embeddings", 0) or getattr(text, "n_positions", 0) or 0)
        self.config = HFShape(seq_len=seq_len or min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN),
                              vocab=tok.num_embeddings, hidden=tok.embedding_dim, hf=hf)
        self.hf_class = type(model).__name__
        self.stack_name = stack_name
        self.notes = _layout_notes(text, self.config.seq_len)  # read by the profiler into ModelProfile.notes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) if self.embed is not None else tokens
        seq_len = x.shape[1] * self.sequence_shards  # (sequence parallelism hands on [b, s/tp, h] shards)
        positions = self.global_positions if self.global_positions is not None else torch.arange(seq_len,
                                                                                                  device=x.device)
        assert positions.shape[0] == seq_len, (positions.shape, seq_len)
        positions = positions.unsqueeze(0)  # [1, s]
        kwargs = {}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(x, positions)
            kwargs["position_ids"] = positions
        for block in self.layers.values():
            x = block(x, **kwargs)
            x = x[0] if isinstance(x, tuple) else x
        x = self.norm(x) if self.norm is not None else x
        return self.output(x) if self.output is not None else x

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter, normal(0, 0.02) for weights (stacked experts' included), ones and
        zeros for norms, zeros for biases, and the rotary tables from the config; deterministic given seed
        and independent of transformers' own init signature."""
        if seed is not None:
            torch.manual_seed(seed)
        seen: set[int] = set()
        for module in self.modules():
            for pname, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue  # a tied weight is drawn once
                seen.add(id(param))
                if _is_norm(module):
                    nn.init.ones_(param) if pname == "weight" else nn.init.zeros_(param)
                elif pname.endswith("bias"):
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, std=0.02)
            if self.rotary is module or hasattr(module, "inv_freq"):
                _reset_rotary(module)


# model types whose laid-out forward tests/models/test_hf.py checks against transformers' own logits
CHECKED_MODEL_TYPES = ("gpt2", "llama", "mixtral", "qwen2", "qwen2_moe")


def _layout_notes(config, seq_len: int) -> list[str]:
    """What the layout may compute differently from transformers' own forward, one line each."""
    notes = []
    model_type = getattr(config, "model_type", "?")
    if model_type not in CHECKED_MODEL_TYPES:
        notes.append(f"model_type {model_type!r} is laid out by the generic embed -> layers -> norm -> output "
                     f"runner without a check against transformers' forward (checked: {', '.join(CHECKED_MODEL_TYPES)})")
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and isinstance(window, int) and 0 < window < seq_len:
        notes.append(f"sliding-window attention ({window} tokens) is run as full causal attention over {seq_len}")
    return notes


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _reset_rotary(module: nn.Module) -> None:
    """The rotary tables (buffers, not parameters) recomputed from the config, as the module's constructor does."""
    if not hasattr(module, "inv_freq") or not hasattr(module, "config"):
        return
    rope_type = getattr(module, "rope_type", "default")
    if rope_type == "default":
        init = module.compute_default_rope_parameters
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, _ = init(module.config)
    module.inv_freq.copy_(inv_freq)
    if hasattr(module, "original_inv_freq"):
        module.original_inv_freq.copy_(inv_freq)
