"""A user's model file as autoplan reads it: `build_model()` returns an nn.Module, CONFIG gives seq_len.

This one is a 1.3B-parameter GPT (24 layers, h=2048) written with plain torch modules; autoplan
builds it on the meta device, so no memory is used however large you make it.
"""

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {"seq_len": 2048, "vocab": 50304, "hidden": 2048, "heads": 16, "layers": 24}


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(hidden)
        self.attention = nn.ModuleDict({"qkv": nn.Linear(hidden, 3 * hidden), "proj": nn.Linear(hidden, hidden)})
        self.ffn_norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.attention["qkv"](x).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.attention["proj"](out.transpose(1, 2).reshape(b, s, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.attention_norm(x))
        return x + self.mlp(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, hidden: int, heads: int, layers: int, seq_len: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, hidden)
        self.pos_embeddings = nn.Embedding(seq_len, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_embeddings(tokens) + self.pos_embeddings(positions)
        for block in self.layers:
            x = block(x)
        return self.output(self.norm(x))


def build_model() -> nn.Module:
    return GPT(CONFIG["vocab"], CONFIG["hidden"], CONFIG["heads"], CONFIG["layers"], CONFIG["seq_len"])
