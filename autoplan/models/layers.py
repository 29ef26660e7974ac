"""Building blocks of the reference models: norms, rotary embedding, attention, MLPs, MoE.

Model code never imports the rest of autoplan: parallelism is applied from outside (executor), and the
profiler reads these modules like any user's model. Attention is written two ways: `sdpa`
(F.scaled_dot_product_attention, what fast training stacks run) and `eager` (explicit softmax and
dropout, Megatron-LM's layout, whose saved activations Korthikanti et al. 2022 count).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a fused kernel's memory: saves the input and the fp32 1/rms per token, nothing else.

    y = x · r · w with r = (mean(x²) + eps)^-1/2; backward (per row, n = dim):
    dx = r · (g·w − x̂ · mean(g·w · x̂)) with x̂ = x·r; dw = Σ_rows g · x̂.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = _at_least_fp32(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [.., 1] fp32
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = _at_least_fp32(x) * rstd
        g_w = _at_least_fp32(grad) * weight
        dx = rstd * (g_w - x_hat * (g_w * x_hat).mean(-1, keepdim=True))
        dw = (_at_least_fp32(grad) * x_hat).flatten(0, -2).sum(0)
        return dx.type_as(x), dw.type_as(weight), None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def rope_frequencies(head_dim: int, seq_len: int, theta: float = 500000.0) -> torch.Tensor:
    """cos/sin table [seq, head_dim/2, 2] of rotary position embedding (Su et al. 2021, eq. 34)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [b, s, heads, d] by the angles of freqs [s, d/2, 2].

    Written as x·cos + swap(x)·sin in x's dtype so autograd saves only the (constant) tables.
    """
    cos = freqs[: x.shape[1], :, 0].repeat_interleave(2, dim=-1)[None, :, None, :].to(x.dtype)  # [1, s, 1, d]
    sin = freqs[: x.shape[1], :, 1].repeat_interleave(2, dim=-1)[None, :, None, :].to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (-x[2i+1], x[2i])
    return x * cos + swapped * sin


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads (Ainslie et al. 2023) and optional RoPE."""

    def __init__(self, hidden: int, heads: int, kv_heads: int | None = None, *, rope: bool = False,
                 bias: bool = False, dropout: float = 0.0, impl: str = "sdpa", max_seq_len: int = 2048,
                 head_dim: int = 0, qk_norm: bool = False, norm_eps: float = 1e-6):
        """head_dim: per head (0: hidden/heads; Qwen3 sets it apart, e.g. 128 with hidden 4096 and 64 heads);
        qk_norm: an RMSNorm over each head's query and key before RoPE (Qwen3)."""
        super().__init__()
        kv_heads = kv_heads or heads
        if (not head_dim and hidden % heads) or heads % kv_heads:
            raise ValueError(f"hidden={hidden}, heads={heads}, kv_heads={kv_heads} must divide evenly")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"attention impl must be sdpa or eager, not {impl!r}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim or hidden // heads
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, eps=norm_eps), RMSNorm(self.head_dim, eps=norm_eps)
        self.rope, self.dropout, self.impl = rope, dropout, impl
        self.wq = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(heads * self.head_dim, hidden, bias=bias)
        self.qk_norm = qk_norm
        if impl == "eager":
            mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool).triu(1)
            self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)  # [b, s, heads/tp, d] (heads per rank under tp)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, d]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if self.impl == "sdpa":
            dropout = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # [b, heads, s, s]
            scores = scores.masked_fill(self.causal_mask[:s, :s], float("-inf"))
            probs = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
            out = probs @ v
        out = out.transpose(1, 2).contiguous().view(b, s, -1)
        return F.dropout(self.wo(out), self.dropout, self.training)


class MLP(nn.Module):
    """GPT feed-forward: w2(gelu(w1 x)) (Radford et al. 2019; Megatron-LM layout)."""

    def __init__(self, hidden: int, ffn_hidden: int, *, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn_hidden, bias=bias)
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.w2(F.gelu(self.w1(x))), self.dropout, self.training)


class SwiGLU(nn.Module):
    """Llama feed-forward: w2(silu(w1 x) * w3 x) (Shazeer 2020, eq. 6)."""

    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Shazeer et al. 2017; Mixtral, Jiang et al. 2024), optionally with shared
    experts every token runs (DeepSeekMoE, Dai et al. 2024, Sec. 3.2: one SwiGLU of shared_ffn_hidden, the
    sum of the shared experts' widths) and sigmoid router scores (DeepSeek-V3, arXiv:2412.19437, eq. 13-15:
    top-k of sigmoid affinities, normalised over the chosen k, times routed_scale; the auxiliary-loss-free
    balancing bias and the node-limited group routing, which only change which experts are chosen, are left out).

    Expert weights are stacked [experts, ...] so expert parallelism shards dim 0. Tokens are sorted by
    expert and each expert runs on its contiguous slice. On the meta device (or with fake tensors, in a dry run) the per-expert counts are
    unknown, so routing is taken as perfectly balanced (tokens*top_k/experts each): the profile then
    holds the expected cost, and the cost model adds the imbalance.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, *, shared_ffn_hidden: int = 0,
                 score: str = "softmax", routed_scale: float = 1.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"router score must be softmax or sigmoid, not {score!r}")
        self.num_experts, self.top_k, self.score, self.routed_scale = num_experts, top_k, score, routed_scale
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.shared = SwiGLU(hidden, shared_ffn_hidden) if shared_ffn_hidden else None
        scale = 1.0 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.randn(num_experts, ffn_hidden, hidden) * scale)
        self.w3 = nn.Parameter(torch.randn(num_experts, ffn_hidden, hidden) * scale)
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, ffn_hidden) / math.sqrt(ffn_hidden))

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts of each token and their renormalised softmax weights: ([T, k], [T, k])."""
        logits = _at_least_fp32(self.router(tokens))
        probs = logits.softmax(dim=-1) if self.score == "softmax" else logits.sigmoid()
        weights, experts = probs.topk(self.top_k, dim=-1)
        return experts, (self.routed_scale * weights / weights.sum(-1, keepdim=True)).type_as(tokens)

    def expert_counts(self, flat_experts: torch.Tensor) -> list[int]:
        if flat_experts.is_meta or is_fake(flat_experts):  # no values: balanced routing, each expert's expected load
            base, extra = divmod(flat_experts.numel(), self.num_experts)
            return [base + (e < extra) for e in range(self.num_experts)]
        return torch.bincount(flat_experts, minlength=self.num_experts).tolist()

    def run_experts(self, grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """SwiGLU of each expert on its contiguous rows of `grouped` (rows sorted by expert)."""
        # each stacked weight unbound once and the rows split once: indexing w[e] and rows per expert made every
        # expert's backward write zeros the size of the whole stack and add them (select_backward,
        # slice_backward), experts-fold traffic: a third of mixtral-8x7b's step without ep in the time dry run
        outputs = [(F.silu(rows @ w1.t()) * (rows @ w3.t())) @ w2.t()
                   for rows, w1, w3, w2 in zip(grouped.split(counts), self.w1.unbind(0), self.w3.unbind(0),
                                               self.w2.unbind(0))]
        return torch.cat(outputs) if outputs else grouped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        tokens = x.reshape(-1, h)  # [T, h]
        experts, weights = self.route(tokens)
        flat = experts.reshape(-1)  # [T*k]
        order = flat.argsort(stable=True)
        grouped = tokens.repeat_interleave(self.top_k, dim=0)[order]  # [T*k, h] sorted by expert
        out = self.run_experts(grouped, self.expert_counts(flat))
        combined = torch.empty_like(out).index_copy(0, order, out)  # back to token order
        combined = (combined.view(-1, self.top_k, h) * weights.unsqueeze(-1)).sum(1).view(b, s, h)
        return combined + self.shared(x) if self.shared is not None else combined
