"""Named model configurations: published architectures and two tiny models that train on CPU in seconds."""

from __future__ import annotations

from autoplan.models.transformer import Transformer, gpt, llama, moe

# name -> (factory, keyword arguments, source of the architecture)
NAMED_CONFIGS: dict[str, tuple] = {
    "gpt-tiny": (gpt, dict(layers=4, hidden=64, heads=4, vocab=512, seq_len=64, ffn_hidden=256),
                 "autoplan test model"),
    "moe-tiny": (moe, dict(layers=4, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=512, seq_len=64,
                           num_experts=4, top_k=2), "autoplan test model"),
    # held-out CPU bench models (benchmarks/bench_cpu_held_out.py): big enough that kernels, not per-call
    # framework costs, decide a step on a CPU rank (about a second), small enough to run 15+ plans in minutes
    "gpt-bench": (gpt, dict(layers=6, hidden=256, heads=8, vocab=2048, seq_len=256, ffn_hidden=1024),
                  "autoplan CPU bench model"),
    "moe-bench": (moe, dict(layers=4, hidden=256, heads=8, kv_heads=4, ffn_hidden=512, vocab=2048, seq_len=256,
                            num_experts=4, top_k=2), "autoplan CPU bench model"),
    "gpt3-175b": (gpt, dict(layers=96, hidden=12288, heads=96, vocab=51200, seq_len=2048, ffn_hidden=49152),
                  "Brown et al. 2020, Table 2.1 (vocab padded to 51200 as in Megatron-LM)"),
    "llama3-8b": (llama, dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256,
                              seq_len=8192), "Dubey et al. 2024, Table 3"),
    "llama3-70b": (llama, dict(layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, vocab=128256,
                               seq_len=8192), "Dubey et al. 2024, Table 3"),
    "llama3-405b": (llama, dict(layers=126, hidden=16384, heads=128, kv_heads=8, ffn_hidden=53248, vocab=128256,
                                seq_len=8192), "Dubey et al. 2024, Table 3"),
    "llama3.2-1b": (llama, dict(layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192, vocab=128256,
                                seq_len=8192), "Meta Llama 3.2 1B config.json (its output head is tied to the "
                    "embedding; here it is a separate matrix: +263M parameters)"),
    "llama3.2-3b": (llama, dict(layers=28, hidden=3072, heads=24, kv_heads=8, ffn_hidden=8192, vocab=128256,
                                seq_len=8192), "Meta Llama 3.2 3B config.json (its output head is tied to the "
                    "embedding; here it is a separate matrix: +394M parameters)"),
    "mixtral-8x7b": (moe, dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=32000,
                               seq_len=4096, num_experts=8, top_k=2), "Jiang et al. 2024, Table 1"),
}


def named_config(name: str) -> dict:
    """The keyword arguments of a named model (a copy)."""
    return dict(NAMED_CONFIGS[name][1])


def build_named(name: str, **overrides) -> Transformer:
    """Build a named model on the current default device (use `with torch.device("meta")` for big ones)."""
    factory, kwargs, _ = NAMED_CONFIGS[name]
    return factory(**{**kwargs, **overrides})
