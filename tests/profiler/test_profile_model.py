"""The static profiler: FLOPs and activation memory of traced layers against the published formulas, layer
structure and reuse of identical blocks, MoE facts, inputs it accepts and refuses, and the JSON round trip."""

import textwrap
import time

import pytest
import torch

import autoplan as ap
import autoplan.profiler.model as profiler_model
from autoplan.errors import InvalidInputError
from autoplan.models import build_named, named_config
from autoplan.schema import ModelProfile


def on_meta(factory, **kwargs):
    with torch.device("meta"):
        return factory(**kwargs)


def block_layers(profile: ModelProfile, block: int):
    return [layer for layer in profile.layers if layer.block == block]


# ----------------------------------------------------------------------------------------- FLOPs
# GPT block, b=1: h=1024, s=512, a=16, ffn 4h. Numbers used below:
#   b·s·h² = 512·1024² = 536,870,912      b·s²·h = 512²·1024 = 268,435,456
S, H, A, V = 512, 1024, 16, 1000
BSH2, BS2H = S * H * H, S * S * H


def test_gpt_block_forward_flops_megatron():
    """Oracle: Narayanan et al. 2021, Sec. 5.1: a GPT block's forward is 24·b·s·h² + 4·b·s²·h FLOPs.

    attention: QKV 3·2bsh², QK^T and PV 2·2bs²h, output projection 2bsh²  -> 8bsh² + 4bs²h
    MLP (4h):  two GEMMs of 2·b·s·h·4h                                     -> 16bsh²
    Biases are not counted (torch's flop counter counts addmm as its mm), and the causal mask halves nothing.
    """
    profile = ap.profile_model(on_meta(ap.models.gpt, layers=2, hidden=H, heads=A, vocab=V, seq_len=S,
                                       ffn_hidden=4 * H), seq_len=S)
    for block in (0, 1):
        attention, mlp = block_layers(profile, block)
        assert (attention.kind, mlp.kind) == ("attention", "mlp")
        assert attention.fwd_flops == 8 * BSH2 + 4 * BS2H   # 4,294,967,296 + 1,073,741,824 = 5,368,709,120
        assert mlp.fwd_flops == 16 * BSH2                    # 8,589,934,592
        assert attention.fwd_flops + mlp.fwd_flops == 24 * BSH2 + 4 * BS2H  # 13,958,643,712
        assert attention.attention_core_fwd_flops == 4 * BS2H


def test_gpt_block_backward_flops_flash():
    """Oracle: backward of a GEMM is 2 GEMMs (Narayanan et al. 2021: 3x forward in all); torch's flop counter
    counts flash/memory-efficient attention backward as 2.5x its forward (5 GEMMs vs 2; recomputes P).

    bwd = 2·24bsh² + 2.5·4bs²h = 25,769,803,776 + 2,684,354,560 = 28,454,158,336
    """
    profile = ap.profile_model(on_meta(ap.models.gpt, layers=1, hidden=H, heads=A, vocab=V, seq_len=S), seq_len=S)
    attention, mlp = block_layers(profile, 0)
    assert mlp.bwd_flops == 2 * 16 * BSH2
    assert attention.bwd_flops == 2 * 8 * BSH2 + 2.5 * 4 * BS2H
    assert attention.bwd_flops + mlp.bwd_flops == 28_454_158_336


def test_gpt_block_backward_flops_eager_is_twice_forward():
    """Oracle: with eager attention every FLOP is a GEMM, so backward = 2x forward (Narayanan et al. 2021)."""
    profile = ap.profile_model(on_meta(ap.models.gpt, layers=1, hidden=H, heads=A, vocab=V, seq_len=S,
                                       attn_impl="eager"), attention="eager")
    for layer in block_layers(profile, 0):
        assert layer.bwd_flops == 2 * layer.fwd_flops
    assert profile.attention == "eager"


def test_gpt_whole_model_train_flops_eager():
    """Oracle: Narayanan et al. 2021 eq. (3) without recomputation (3 passes instead of 4):
    F = 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)) = 72·s·l·h² + 12·s²·l·h + 6·s·h·V  (B=1).

    s=256, l=3, h=512, V=1000: 72·256·3·512² + 12·256²·3·512 + 6·256·512·1000
                             = 14,495,514,624 + 1,207,959,552 + 786,432,000 = 16,489,906,176
    Embedding lookups and LayerNorms count 0 FLOPs, as in the paper.
    """
    s, l, h, vocab = 256, 3, 512, 1000
    profile = ap.profile_model(on_meta(ap.models.gpt, layers=l, hidden=h, heads=8, vocab=vocab, seq_len=s,
                                       attn_impl="eager"), attention="eager")
    assert profile.train_flops_per_sequence == 16_489_906_176
    assert profile.train_flops_per_sequence == 72 * s * l * h * h + 12 * s * s * l * h + 6 * s * h * vocab
    head = profile.layers[-1]
    assert head.kind == "head" and head.fwd_flops == 2 * s * h * vocab  # logits GEMM; softmax not counted


def test_llama_block_flops_with_grouped_query_attention():
    """Oracle: GEMM count of a Llama block (Touvron et al. 2023; GQA, Ainslie et al. 2023), b=1:
    attention fwd = 2·s·h·(h + 2·kv·d) [Q, K, V] + 2·s·h² [O] + 4·s²·h [core]; SwiGLU fwd = 3·2·s·h·f.

    h=512, heads=8 (d=64), kv=2, f=1536, s=256:
      2·256·512·(512 + 256) + 2·256·512² + 4·256²·512 = 201,326,592 + 134,217,728 + 134,217,728 = 469,762,048
      6·256·512·1536 = 1,207,959,552
    """
    s, h, kv, d, f = 256, 512, 2, 64, 1536
    profile = ap.profile_model(on_meta(ap.models.llama, layers=1, hidden=h, heads=8, kv_heads=kv, ffn_hidden=f,
                                       vocab=V, seq_len=s))
    attention, mlp = block_layers(profile, 0)
    gemm = 2 * s * h * (h + 2 * kv * d) + 2 * s * h * h
    core = 4 * s * s * h
    assert attention.fwd_flops == gemm + core == 469_762_048
    assert attention.bwd_flops == 2 * gemm + 2.5 * core
    assert mlp.fwd_flops == 6 * s * h * f == 1_207_959_552
    assert (attention.num_heads, attention.num_kv_heads) == (8, 2)
    assert [(g.n, g.k, g.count, g.tp_split) for g in attention.gemms] == [(h, h, 1, "n"), (kv * d, h, 2, "n"),
                                                                          (h, h, 1, "k")]


# ----------------------------------------------------------------------------------------- activation memory
def korthikanti_profile(**overrides) -> ModelProfile:
    kwargs = dict(layers=1, hidden=H, heads=A, vocab=V, seq_len=S, dropout=0.1, attn_impl="eager") | overrides
    return ap.profile_model(on_meta(ap.models.gpt, **kwargs), attention="eager")


def test_gpt_block_activation_bytes_korthikanti_eq1():
    """Oracle: Korthikanti et al. 2022, Sec. 4.1 eq. (1): a GPT layer saves s·b·h·(34 + 5·a·s/h) bytes in 16-bit
    with dropout, plus what the paper leaves out: each LayerNorm's fp32 mean and rstd per token.

      attention  11sbh + 5as²b  (QKV input 2, Q K 4, softmax out 2as²b, dropout mask as²b, dropout out 2as²b,
                                 V 2, projection input 2, dropout mask 1) + its LayerNorm input 2sbh
      MLP        19sbh          (input 2, GeLU input 8, GeLU output 8, dropout mask 1) + its LayerNorm input 2sbh
      LN stats   2 norms x 2 fp32 values x s·b x 4 B = 16·s·b
    s=512, b=1, h=1024, a=16: 34·524,288 + 5·16·512² + 16·512 = 17,825,792 + 20,971,520 + 8,192 = 38,805,504
    """
    sbh, as2b, sb = S * H, A * S * S, S
    attention, mlp = block_layers(korthikanti_profile(), 0)
    assert attention.activation_bytes + mlp.activation_bytes == 34 * sbh + 5 * as2b + 16 * sb == 38_805_504
    # the split by layer, each with its own pre-norm
    assert attention.activation_bytes == 13 * sbh + 5 * as2b + 8 * sb
    assert mlp.activation_bytes == 21 * sbh + 8 * sb


def test_gpt_block_tp_sharded_activations_korthikanti_eq2():
    """Oracle: Korthikanti et al. 2022, Sec. 4.2.1 eq. (2): with tensor parallelism t a layer saves
    s·b·h·(10 + 24/t + 5·a·s/(h·t)): the part divided by t is 24·s·b·h + 5·a·s²·b.

      attention: Q K 4sbh, V 2sbh, projection input 2sbh, 5as²b scores     -> 8sbh + 5as²b
      MLP:       GeLU input and output 8sbh each                            -> 16sbh
    s=512, h=1024, a=16: 24·524,288 + 20,971,520 = 12,582,912 + 20,971,520 = 33,554,432
    """
    sbh, as2b = S * H, A * S * S
    attention, mlp = block_layers(korthikanti_profile(), 0)
    assert attention.activation_tp_sharded_bytes == 8 * sbh + 5 * as2b
    assert mlp.activation_tp_sharded_bytes == 16 * sbh
    assert attention.activation_tp_sharded_bytes + mlp.activation_tp_sharded_bytes == 24 * sbh + 5 * as2b


def test_attention_score_bytes_eager_and_flash():
    """Oracle: Korthikanti et al. 2022 Sec. 5 (selective recompute drops 5·a·s²·b: softmax output 2, dropout mask
    1, dropout output 2 bytes per score); a fused (flash) kernel saves no seq x seq tensor (Dao et al. 2022)."""
    attention, mlp = block_layers(korthikanti_profile(), 0)
    assert attention.attention_score_bytes == 5 * A * S * S  # 5·16·512² = 20,971,520
    assert mlp.attention_score_bytes == 0

    flash = ap.profile_model(on_meta(ap.models.gpt, layers=1, hidden=H, heads=A, vocab=V, seq_len=S, dropout=0.1))
    assert flash.attention == "flash"
    assert all(layer.attention_score_bytes == 0 for layer in flash.layers)
    # flash keeps at most the attention's O(s·h) tensors: far below the eager 5as²b
    assert block_layers(flash, 0)[0].activation_bytes < attention.activation_bytes - 4 * A * S * S


def test_activation_bytes_limit_case_no_dropout():
    """Limit case of eq. (1) with dropout 0: the three 1-byte masks (as²b + 2sbh) and the dropout output (2as²b)
    disappear; softmax output stays: 34sbh - 2sbh + 2as²b + 16sb."""
    sbh, as2b = S * H, A * S * S
    attention, mlp = block_layers(korthikanti_profile(dropout=0.0), 0)
    assert attention.activation_bytes + mlp.activation_bytes == 32 * sbh + 2 * as2b + 16 * S
    assert attention.attention_score_bytes == 2 * as2b


# ----------------------------------------------------------------------------------------- structure
def test_llama3_405b_profile_fast_complete_and_traced_once(monkeypatch):
    """Oracle: the model's own parameter count; layer list 2 per block + embed + norm + output; identical blocks
    traced once: embed 1 + one block (whole + 2 norms + attention + feed-forward = 5) + norm 1 + output 1 = 8 calls
    at most, against 126 blocks."""
    calls = []
    real_trace = profiler_model.trace
    monkeypatch.setattr(profiler_model, "trace", lambda *a, **k: calls.append(a[0]) or real_trace(*a, **k))
    start = time.perf_counter()
    model = on_meta(build_named, name="llama3-405b")
    profile = ap.profile_model(model)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 30
    assert profile.total_params == sum(p.numel() for p in model.parameters()) == 405_853_388_800
    assert profile.num_blocks == 126 and len(profile.layers) == 2 * 126 + 3
    assert len(calls) <= 8
    assert [layer.kind for layer in profile.layers[:3]] == ["embedding", "attention", "mlp"]
    assert [layer.kind for layer in profile.layers[-2:]] == ["norm", "head"]
    # the reused template carries each block's own name and index
    assert profile.layers[-3].name == "layers.125.feed_forward" and profile.layers[-3].block == 125
    assert (profile.seq_len, profile.num_heads, profile.num_kv_heads, profile.hidden) == (8192, 128, 8, 16384)


def test_gpt_tiny_kinds_in_forward_order():
    """Oracle: gpt-tiny's forward: embed, 4 x (attention, mlp), final norm, output head."""
    profile = ap.profile_model("gpt-tiny")
    assert [layer.kind for layer in profile.layers] == ["embedding"] + ["attention", "mlp"] * 4 + ["norm", "head"]
    assert [layer.block for layer in profile.layers] == [None, 0, 0, 1, 1, 2, 2, 3, 3, None, None]
    assert profile.name == "gpt-tiny" and profile.seq_len == 64
    assert (profile.vocab_size, profile.hidden, profile.dtype, profile.dtype_bytes) == (512, 64, "bfloat16", 2)


def test_tp_sharded_params_follow_megatron_layout():
    """Oracle: Shoeybi et al. 2019 Sec. 3: QKV and w1 column-parallel (weight and bias split), wo and w2
    row-parallel (weight split, bias replicated), norms replicated, output head split by vocabulary.

    gpt-tiny h=64, f=256: attention 3·(64² + 64) + 64² = 12,480 + 4,096 = 16,576;
    mlp 64·256 + 256 + 256·64 = 33,024; head 512·64 = 32,768.
    """
    profile = ap.profile_model("gpt-tiny")
    _, attention, mlp = profile.layers[:3]
    assert attention.tp_sharded_params == 16_576 and attention.params == 16_576 + 64 + 2 * 64  # + wo bias + LN
    assert mlp.tp_sharded_params == 33_024 and mlp.params == 33_024 + 64 + 2 * 64                # + w2 bias + LN
    assert profile.layers[-1].tp_sharded_params == profile.layers[-1].params == 32_768
    assert profile.layers[-2].tp_sharded_params == 0
    # wq, wk, wv (64 x 64 each) merge into one shape counted 3 times; the core is not a weight GEMM
    assert [(g.m_per_sequence, g.n, g.k, g.count, g.tp_split) for g in attention.gemms] == [
        (64.0, 64, 64, 3, "n"), (64.0, 64, 64, 1, "k")]
    assert [(g.n, g.k, g.tp_split) for g in mlp.gemms] == [(256, 64, "n"), (64, 256, "k")]


def test_embedding_tp_sharded_params_are_the_token_table_only():
    """Oracle: Megatron-LM (Shoeybi et al. 2019 Sec. 3): only the word embedding is split along the vocabulary;
    the position embedding is replicated. gpt-tiny: token table 512·64 = 32,768 of 32,768 + 64·64 = 36,864."""
    embed = ap.profile_model("gpt-tiny").layers[0]
    assert embed.params == 36_864
    assert embed.tp_sharded_params == 32_768


def test_moe_tiny_profile():
    """Oracle: moe-tiny's config (E=4, k=2, h=64, f=128, s=64). Expert weights w1, w3 [E, f, h] and w2 [E, h, f]:
    3·4·128·64 = 98,304 expert params per layer. On meta routing is balanced: each expert gets s·k/E = 32 rows,
    so fwd = router 2·s·h·E + experts 3·2·(s·k)·h·f = 32,768 + 6,291,456 = 6,324,224 FLOPs."""
    model = on_meta(build_named, name="moe-tiny")
    profile = ap.profile_model(model)
    moe_layers = [layer for layer in profile.layers if layer.kind == "moe"]
    assert len(moe_layers) == 4 and all(layer.block == i for i, layer in enumerate(moe_layers))
    for layer in moe_layers:
        assert layer.expert_params == 98_304
        assert layer.params == 98_304 + 64 * 4 + 64  # + router + ffn_norm
        assert (layer.num_experts, layer.top_k) == (4, 2)
        assert layer.fwd_flops == 6_324_224 and layer.bwd_flops == 2 * 6_324_224
        assert {(g.m_per_sequence, g.count) for g in layer.gemms if g.n != 4} == {(32.0, 8), (32.0, 4)}
    assert (profile.num_experts, profile.top_k, profile.num_heads, profile.num_kv_heads) == (4, 2, 4, 2)
    assert profile.total_params == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- inputs
USER_MODEL_PY = """
import torch
from torch import nn

CONFIG = {"seq_len": 16}

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        return x + self.mlp(self.norm(x))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(32, 100)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

def build_model():
    return Net()
"""


def test_profile_a_user_model_py(tmp_path):
    """Oracle: the user's own numbers: CONFIG's seq_len, 3 blocks, parameters summed from the module, and MLP
    FLOPs 2·2·s·32·64 = 2·2·16·2048 = 131,072 per block."""
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(USER_MODEL_PY))
    profile = ap.profile_model(str(path))
    assert profile.name == str(path) and profile.seq_len == 16 and profile.num_blocks == 3
    blocks = [layer for layer in profile.layers if layer.block is not None]
    assert len(blocks) == 3 and all(layer.fwd_flops == 131_072 for layer in blocks)
    params = 100 * 32 + 3 * (2 * 32 + 32 * 64 + 64 + 64 * 32 + 32) + 32 * 100 + 100
    assert profile.total_params == params
    assert profile.layers[0].kind == "embedding" and profile.layers[-1].kind == "head"


def test_seq_len_argument_overrides_config(tmp_path):
    """Oracle: the caller's seq_len wins over CONFIG (the CLI's --seq-len)."""
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(USER_MODEL_PY))
    assert ap.profile_model(str(path), seq_len=8).seq_len == 8


def test_model_not_on_meta_is_refused():
    """Limit case: a model with real (CPU) weights -> InvalidInputError pointing at the meta device."""
    model = build_named("gpt-tiny")
    with pytest.raises(InvalidInputError, match="meta"):
        ap.profile_model(model)


def test_unknown_seq_len_and_attention_mode_are_refused(tmp_path):
    """Limit cases: no seq_len anywhere -> InvalidInputError; attention not flash/eager -> InvalidInputError."""
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(USER_MODEL_PY).replace('CONFIG = {"seq_len": 16}', ""))
    with pytest.raises(InvalidInputError, match="seq_len"):
        ap.profile_model(str(path))
    with pytest.raises(InvalidInputError, match="flash or eager"):
        ap.profile_model("gpt-tiny", attention="sdpa")


def test_profile_restores_parameter_dtype():
    """Oracle: the model passed in, before the call: tracing in bf16 must not change its parameters' dtype."""
    model = on_meta(build_named, name="gpt-tiny")
    ap.profile_model(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_profile_restores_buffer_dtype():
    """Oracle: the model passed in, before the call: its fp32 rotary table must stay fp32, or a later
    to_empty + init_weights trains with a bf16 RoPE table."""
    model = on_meta(build_named, name="moe-tiny")
    ap.profile_model(model)
    assert model.freqs.dtype == torch.float32


def test_profile_json_round_trip(tmp_path):
    """Oracle: equality after ModelProfile JSON dump and validate, and after save/load through a file."""
    profile = ap.profile_model("moe-tiny")
    assert ModelProfile.model_validate_json(profile.model_dump_json()) == profile
    profile.save(tmp_path / "profile.json")
    assert ModelProfile.load(tmp_path / "profile.json") == profile


def test_named_config_profile_matches_named_config():
    """Oracle: the named config's own numbers carried into the profile."""
    config = named_config("moe-tiny")
    profile = ap.profile_model("moe-tiny", seq_len=32)
    assert profile.seq_len == 32
    assert profile.num_blocks == config["layers"] and profile.hidden == config["hidden"]


def test_streaming_bytes_are_the_copies_indexing_and_add_mul_of_a_layer():
    """Oracle: a layer of only streaming ops (x * 2 + x, cat) and one of only a gelu, traced by hand: all of the
    first's memory-bound bytes are streaming, none of the second's. moe-tiny's MoE layer (routing: index, index_copy,
    mul by the gate) has streaming bytes, at most its memory-bound bytes."""
    from autoplan.profiler.trace import trace_layer

    class Streaming(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x * 2 + x, x], dim=-1)

    x = torch.randn(2, 8, 16)
    streaming = trace_layer(Streaming(), (x,), {})
    gelu = trace_layer(torch.nn.GELU(), (x,), {})
    assert streaming.memory_bound_bytes > 0 and streaming.streaming_bytes == streaming.memory_bound_bytes
    assert gelu.memory_bound_bytes > 0 and gelu.streaming_bytes == 0
    moe = next(layer for layer in ap.profile_model("moe-tiny").layers if layer.kind == "moe")
    assert 0 < moe.streaming_bytes <= moe.memory_bound_bytes


def test_backward_memory_bound_bytes_follow_the_gradients_through_tp():
    """Oracle by hand (fp32, one sequence of 8 tokens, hidden 16, ffn 32): x + w2(gelu(w1(x))). Forward: the gelu
    reads and writes [8, 32] (2048 bytes, between the column- and the row-parallel Linear: sharded), the residual
    add reads two [8, 16] and writes one (1536, whole). Backward: gelu's backward reads the row-parallel Linear's
    input gradient and the saved input and writes one [8, 32] (3072, sharded: a row-parallel input gradient is
    split by tp); adding the two input gradients of x (1536) is whole, as a column-parallel input gradient is.
    The stand-in loss and the weight gradients' accumulation are not the layer's per-sequence bytes."""
    from autoplan.profiler.trace import trace_layer

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Linear(16, 32, bias=False)
            self.w2 = torch.nn.Linear(32, 16, bias=False)

        def forward(self, x):
            return x + self.w2(torch.nn.functional.gelu(self.w1(x)))

    result = trace_layer(MLP(), (torch.randn(1, 8, 16),), {})
    assert (result.memory_bound_bytes, result.memory_bound_tp_sharded_bytes) == (3584, 2048)
    assert (result.memory_bound_bwd_bytes, result.memory_bound_bwd_tp_sharded_bytes) == (4608, 3072)
    assert result.streaming_bwd_bytes == 1536  # the add; gelu's backward is not a streaming op


def test_a_norms_backward_moves_more_than_twice_its_forward():
    """llama3-8b as traced: its blocks' backward moves more than twice their forward's bytes in the ops tp does
    not split (the fp32 RMSNorm's backward), which the estimate once assumed of every op."""
    profile = ap.profile_model("llama3-8b")
    attention = next(layer for layer in profile.layers if layer.kind == "attention")
    whole_fwd = attention.memory_bound_bytes - attention.memory_bound_tp_sharded_bytes
    whole_bwd = attention.memory_bound_bwd_bytes - attention.memory_bound_bwd_tp_sharded_bytes
    assert whole_bwd > 2.5 * whole_fwd
