"""Multi-head latent attention (MLA) of DeepSeek-V2/V3 (DeepSeek-AI 2024, arXiv:2405.04434, Sec. 2.1; V3:
arXiv:2412.19437, Sec. 2.1.1): queries and keys/values pass through low-rank latents.

    c_q  = RMSNorm(x W_qa)            [b, s, q_lora_rank]     (or no latent: q = x W_q, q_lora_rank = 0)
    q    = c_q W_qb                   [b, s, heads, d_nope + d_rope]
    c_kv, k_rope = x W_kva            [b, s, kv_lora_rank], [b, s, d_rope]  (k_rope shared by all heads)
    k_nope, v = RMSNorm(c_kv) W_kvb   [b, s, heads, d_nope], [b, s, heads, d_v]
    RoPE on the d_rope parts of q and k; softmax(q k^T / sqrt(d_nope + d_rope)) v; out = o W_o.

The values are zero-padded to the query/key head width for the attention kernel (fused kernels and the
ring attention of context parallelism take one width; DeepSeek's FlashAttention-based code pads the same
way) and the padding sliced off its output. Training runs the expanded form above (as DeepSeek's and Megatron-LM's training code do); the absorbed
form is an inference optimisation. Under tensor parallelism W_qb, W_kvb are column-parallel (by heads),
W_o row-parallel, the latent projections replicated (Megatron-LM's MLA layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autoplan.models.layers import RMSNorm, apply_rope


class MLAttention(nn.Module):
    """Causal multi-head latent attention (module docstring). `heads` are query heads; each has its own key
    and value, so kv_heads = heads."""

    def __init__(self, hidden: int, heads: int, *, q_lora_rank: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        if min(heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim) < 1 or qk_rope_head_dim % 2:
            raise ValueError(f"MLA needs heads, kv_lora_rank, qk_nope/rope and v head dims >= 1 (rope even), got "
                             f"{heads}, {kv_lora_rank}, {qk_nope_head_dim}, {qk_rope_head_dim}, {v_head_dim}")
        self.heads = self.kv_heads = heads
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.kv_lora_rank = kv_lora_rank
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank:
            self.wq_a = nn.Linear(hidden, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps=norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(hidden, heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(hidden, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(heads * v_head_dim, hidden, bias=False)
        self.shared_key = nn.Identity()  # the RoPE key all heads share: where tensor parallelism sums its gradient

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(b, s, -1, self.nope + self.rope_dim)  # [b, s, heads/tp, d_nope + d_rope]
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(b, s, -1, self.nope + self.v_dim)  # [b, s, heads/tp, ...]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        heads = kv.shape[2]
        k_rope = apply_rope(self.shared_key(k_rope).unsqueeze(2), freqs).expand(b, s, heads, self.rope_dim)
        q = torch.cat([q_nope, apply_rope(q_rope, freqs)], dim=-1).transpose(1, 2)  # [b, heads, s, d_qk]
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)
        # values padded to the query/key width: fused (flash) attention kernels take one head width, and so
        # does the ring attention of context parallelism; the padding's outputs are zeros, dropped after
        pad = self.nope + self.rope_dim - self.v_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True,
                                             scale=1.0 / math.sqrt(self.nope + self.rope_dim))[..., :self.v_dim]
        return self.wo(out.transpose(1, 2).reshape(b, s, heads * self.v_dim))
