"""Decoder-only transformers: GPT (Radford et al. 2019), Llama (Touvron et al. 2023) and MoE (Mixtral).

Layout, shared by all three and relied on by the executor: `embed` -> `layers` (a ModuleDict of
blocks "0".."L-1", so a pipeline stage can drop the others and keep names) -> `norm` -> `output`.
Each block is pre-norm: x + attention(attention_norm(x)), then x + feed_forward(ffn_norm(x)).
Build on the meta device for any size, then `to_empty(device=...)` and `init_weights()` to train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from autoplan.models.layers import MLP, Attention, MoE, RMSNorm, SwiGLU, rope_frequencies
from autoplan.models.mla import MLAttention


@dataclass(frozen=True)
class TransformerConfig:
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq_len: int
    ffn_hidden: int
    kv_heads: int | None = None
    family: str = "llama"          # gpt: LayerNorm, GeLU MLP, learned positions; llama/moe: RMSNorm, SwiGLU, RoPE
    num_experts: int = 0
    top_k: int = 0
    dropout: float = 0.0
    attn_impl: str = "sdpa"
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    # MoE refinements (0 / False / "gqa": off, the Mixtral block)
    moe_ffn_hidden: int = 0        # a routed expert's width (fine-grained experts); 0: ffn_hidden
    shared_experts: int = 0        # experts every token runs, each moe_ffn_hidden wide (DeepSeekMoE)
    first_dense_layers: int = 0    # the first blocks have a dense SwiGLU of ffn_hidden instead of experts
    router_score: str = "softmax"  # softmax (Mixtral, Qwen3) or sigmoid (DeepSeek-V3) affinities
    routed_scale: float = 1.0      # routed experts' weights scaled by this (DeepSeek-V3: 2.5)
    head_dim: int = 0              # per attention head; 0: hidden // heads
    qk_norm: bool = False          # RMSNorm on each head's query and key (Qwen3)
    attention: str = "gqa"         # gqa, or mla (DeepSeek multi-head latent attention, models.mla)
    q_lora_rank: int = 0           # MLA: the query latent's width (0: no query latent)
    kv_lora_rank: int = 0          # MLA: the key/value latent's width
    qk_nope_head_dim: int = 0      # MLA: per head, the query/key part without RoPE
    qk_rope_head_dim: int = 0      # MLA: per head, the query/key part with RoPE (the key's shared by heads)
    v_head_dim: int = 0            # MLA: per head, the value's width

    @property
    def rope_dim(self) -> int:
        """Width of the rotary table: the RoPE part of an MLA head, else the head."""
        return self.qk_rope_head_dim if self.attention == "mla" else (self.head_dim or self.hidden // self.heads)

    def to_dict(self) -> dict:
        return asdict(self)


class Embedding(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.tok = nn.Embedding(config.vocab, config.hidden)
        self.pos = nn.Embedding(config.seq_len, config.hidden) if config.family == "gpt" else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)  # [b, s, h]
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.dropout(x)


def _attention(config: TransformerConfig) -> nn.Module:
    if config.attention == "mla":
        return MLAttention(config.hidden, config.heads, q_lora_rank=config.q_lora_rank,
                           kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
                           qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
                           norm_eps=config.norm_eps)
    if config.attention != "gqa":
        raise ValueError(f"attention must be gqa or mla, not {config.attention!r}")
    gpt = config.family == "gpt"
    return Attention(config.hidden, config.heads, config.kv_heads, rope=not gpt, bias=gpt, dropout=config.dropout,
                     impl=config.attn_impl, max_seq_len=config.seq_len, head_dim=config.head_dim,
                     qk_norm=config.qk_norm, norm_eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, index: int = 0):
        super().__init__()
        gpt = config.family == "gpt"
        norm = (lambda: nn.LayerNorm(config.hidden, eps=config.norm_eps)) if gpt else \
            (lambda: RMSNorm(config.hidden, eps=config.norm_eps))
        self.attention_norm = norm()
        self.attention = _attention(config)
        self.ffn_norm = norm()
        if config.num_experts and index >= config.first_dense_layers:
            width = config.moe_ffn_hidden or config.ffn_hidden
            self.feed_forward = MoE(config.hidden, width, config.num_experts, config.top_k,
                                    shared_ffn_hidden=config.shared_experts * width, score=config.router_score,
                                    routed_scale=config.routed_scale)
        elif gpt:
            self.feed_forward = MLP(config.hidden, config.ffn_hidden, dropout=config.dropout)
        else:
            self.feed_forward = SwiGLU(config.hidden, config.ffn_hidden)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), freqs)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """tokens [b, s] (int64) -> logits [b, s, vocab]. Stages of a pipeline may hold None parts."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.layers)})
        self.norm = nn.LayerNorm(config.hidden, eps=config.norm_eps) if config.family == "gpt" else \
            RMSNorm(config.hidden, eps=config.norm_eps)
        self.output = nn.Linear(config.hidden, config.vocab, bias=False)
        if config.family != "gpt":
            self.register_buffer("freqs", self._rope_table(), persistent=False)
        else:
            self.freqs = None

    def _rope_table(self) -> torch.Tensor:
        c = self.config
        return rope_frequencies(c.rope_dim, c.seq_len, c.rope_theta)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter and buffer, e.g. after `to_empty` from meta. Deterministic given seed."""
        if seed is not None:
            torch.manual_seed(seed)
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoE):
                for weight in (module.w1, module.w2, module.w3):
                    nn.init.normal_(weight, std=std)
            elif isinstance(module, Attention) and module.impl == "eager":
                s = self.config.seq_len
                module.causal_mask.copy_(torch.ones(s, s, dtype=torch.bool).triu(1))
        if self.freqs is not None:
            self.freqs.copy_(self._rope_table())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) if self.embed is not None else tokens
        for block in self.layers.values():
            x = block(x, self.freqs)
        x = self.norm(x) if self.norm is not None else x
        return self.output(x) if self.output is not None else x


def gpt(*, layers: int, hidden: int, heads: int, vocab: int, seq_len: int, ffn_hidden: int | None = None,
        dropout: float = 0.0, attn_impl: str = "sdpa") -> Transformer:
    """GPT-2/3 style: learned positions, LayerNorm, GeLU MLP with biases (ffn_hidden defaults to 4h)."""
    return Transformer(TransformerConfig(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq_len,
                                         ffn_hidden=ffn_hidden or 4 * hidden, family="gpt", dropout=dropout,
                                         attn_impl=attn_impl))


def llama(*, layers: int, hidden: int, heads: int, kv_heads: int | None = None, ffn_hidden: int, vocab: int,
          seq_len: int, rope_theta: float = 500000.0, attn_impl: str = "sdpa") -> Transformer:
    """Llama 2/3 style: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases."""
    return Transformer(TransformerConfig(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                                         seq_len=seq_len, ffn_hidden=ffn_hidden, family="llama",
                                         rope_theta=rope_theta, attn_impl=attn_impl))


def moe(*, layers: int, hidden: int, heads: int, kv_heads: int | None = None, ffn_hidden: int, vocab: int,
        seq_len: int, num_experts: int, top_k: int, rope_theta: float = 1000000.0, **refinements) -> Transformer:
    """Mixtral style: a Llama block whose feed-forward is top-k routed SwiGLU experts.

    refinements (TransformerConfig's MoE fields): moe_ffn_hidden (fine-grained experts), shared_experts,
    first_dense_layers (dense SwiGLU of ffn_hidden), router_score, routed_scale, head_dim, qk_norm,
    norm_eps, and attention="mla" with q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
    v_head_dim (DeepSeek-V2/V3)."""
    known = {f for f in TransformerConfig.__dataclass_fields__} - {"layers", "hidden", "heads", "kv_heads", "vocab",
                                                                   "seq_len", "ffn_hidden", "family", "num_experts",
                                                                   "top_k", "rope_theta"}
    unknown = sorted(set(refinements) - known)
    if unknown:
        raise TypeError(f"moe() got unexpected keyword arguments: {', '.join(unknown)}")
    return Transformer(TransformerConfig(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                                         seq_len=seq_len, ffn_hidden=ffn_hidden, family="moe",
                                         num_experts=num_experts, top_k=top_k, rope_theta=rope_theta, **refinements))
