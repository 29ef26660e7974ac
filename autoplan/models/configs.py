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
    "deepseek-tiny": (moe, dict(layers=3, hidden=64, heads=4, ffn_hidden=128, moe_ffn_hidden=32, shared_experts=1,
                                first_dense_layers=1, vocab=512, seq_len=64, num_experts=8, top_k=2,
                                router_score="sigmoid", routed_scale=2.5, attention="mla", q_lora_rank=32,
                                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
                      "autoplan test model (DeepSeek-V3's block kinds: MLA, a dense first layer, shared and "
                      "fine-grained experts)"),
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
    "mixtral-8x22b": (moe, dict(layers=56, hidden=6144, heads=48, kv_heads=8, ffn_hidden=16384, vocab=32000,
                                seq_len=4096, num_experts=8, top_k=2),
                      "mistral-community/Mixtral-8x22B-v0.1 config.json (141B total, 39B active: Mistral AI, "
                      "'Cheaper, Better, Faster, Stronger', 2024)"),
    "qwen3-30b-a3b": (moe, dict(layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, qk_norm=True,
                                ffn_hidden=6144, moe_ffn_hidden=768, vocab=151936, seq_len=4096, num_experts=128,
                                top_k=8, norm_eps=1e-6),
                      "Qwen/Qwen3-30B-A3B config.json (Qwen3 Technical Report, Yang et al. 2025, Table 2: 30.5B "
                      "total, 3.3B active; untied head; every layer MoE, ffn_hidden unused)"),
    "qwen3-235b-a22b": (moe, dict(layers=94, hidden=4096, heads=64, kv_heads=4, head_dim=128, qk_norm=True,
                                  ffn_hidden=12288, moe_ffn_hidden=1536, vocab=151936, seq_len=4096, num_experts=128,
                                  top_k=8, norm_eps=1e-6),
                        "Qwen/Qwen3-235B-A22B config.json (Qwen3 Technical Report, Yang et al. 2025, Table 2: 235B "
                        "total, 22B active; untied head; every layer MoE, ffn_hidden unused)"),
    "deepseek-v3": (moe, dict(layers=61, hidden=7168, heads=128, ffn_hidden=18432, moe_ffn_hidden=2048,
                              shared_experts=1, first_dense_layers=3, vocab=129280, seq_len=4096, num_experts=256,
                              top_k=8, router_score="sigmoid", routed_scale=2.5, rope_theta=10000.0, norm_eps=1e-6,
                              attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                              qk_rope_head_dim=64, v_head_dim=128),
                    "deepseek-ai/DeepSeek-V3 config.json (DeepSeek-AI 2024, arXiv:2412.19437, Sec. 4.2: 671B total, "
                    "37B active, pre-trained at 4K tokens; without the 14B multi-token-prediction module the "
                    "checkpoint adds, the routing bias buffers and the node-limited group routing)"),
}


def named_config(name: str) -> dict:
    """The keyword arguments of a named model (a copy)."""
    return dict(NAMED_CONFIGS[name][1])


def build_named(name: str, **overrides) -> Transformer:
    """Build a named model on the current default device (use `with torch.device("meta")` for big ones)."""
    factory, kwargs, _ = NAMED_CONFIGS[name]
    return factory(**{**kwargs, **overrides})
