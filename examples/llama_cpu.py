"""A small Llama (GQA, SwiGLU, RMSNorm, RoPE) that trains in seconds on a few CPU processes: the model of the
README's plan-then-run walk-through. A model file only has to define build_model() (and CONFIG)."""

import autoplan as ap

CONFIG = {"seq_len": 128, "vocab": 2048}


def build_model():
    return ap.models.llama(layers=4, hidden=128, heads=4, kv_heads=2, ffn_hidden=352, vocab=CONFIG["vocab"],
                           seq_len=CONFIG["seq_len"])
