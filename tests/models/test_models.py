"""Reference models: the API, parameter counts against published numbers, training on CPU, the layers' math,
MoE routing, and the loader for a user's model.py."""

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

import autoplan as ap
from autoplan.errors import ModelLoadError
from autoplan.models import NAMED_CONFIGS, build_named, load_model, named_config
from autoplan.models.layers import (MoE, RMSNorm, SwiGLU, Attention, _RMSNormFunction, apply_rope,
                                    rope_frequencies)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- API
def test_factories_take_the_contract_keywords_on_meta():
    """Oracle: the API contract's calls, verbatim; the built config and block count echo them."""
    with torch.device("meta"):
        g = ap.models.gpt(layers=24, hidden=2048, heads=16, vocab=50257, seq_len=2048, ffn_hidden=8192)
        lm = ap.models.llama(layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, vocab=128256,
                             seq_len=8192)
        mo = ap.models.moe(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=32000,
                           seq_len=4096, num_experts=8, top_k=2)
    for model, layers in ((g, 24), (lm, 80), (mo, 32)):
        assert all(p.is_meta for p in model.parameters())
        assert len(model.layers) == layers
    assert (g.config.family, g.config.ffn_hidden, g.config.vocab) == ("gpt", 8192, 50257)
    assert (lm.config.kv_heads, lm.config.seq_len) == (8, 8192)
    assert (mo.config.num_experts, mo.config.top_k) == (8, 2)
    # a block's keys are "0".."L-1" so that a pipeline stage keeps names (transformer.py docstring)
    assert list(g.layers.keys()) == [str(i) for i in range(24)]


def test_gpt_ffn_hidden_defaults_to_4h():
    """Oracle: GPT-2/3 use a 4h feed-forward (Radford et al. 2019; Brown et al. 2020 Table 2.1: d_ff = 4 d_model)."""
    with torch.device("meta"):
        model = ap.models.gpt(layers=1, hidden=96, heads=4, vocab=10, seq_len=8)
    assert model.layers["0"].feed_forward.w1.out_features == 4 * 96


@pytest.mark.parametrize("kwargs", [dict(hidden=96, heads=5), dict(hidden=96, heads=4, kv_heads=3)])
def test_attention_rejects_heads_that_do_not_divide(kwargs):
    """Limit case: hidden % heads != 0 or heads % kv_heads != 0 cannot be laid out -> ValueError."""
    with pytest.raises(ValueError, match="must divide evenly"):
        Attention(**kwargs)


# ----------------------------------------------------------------------------------------- parameter counts
def gpt_params(*, L: int, h: int, V: int, s: int, f: int) -> int:
    """Exact parameter count of this code's GPT layout.

    Per block:
      attention  wq, wk, wv, wo: 4·h² weights + 4·h biases
      mlp        w1 (h x f) + f bias, w2 (f x h) + h bias: 2·h·f + f + h
      2 LayerNorms (weight + bias): 4·h
    -> with f = 4h: 12·h² + 13·h  (Narayanan et al. 2021 drop the 13·h)
    Outside blocks: token embedding V·h, learned positions s·h, final LayerNorm 2·h, untied output head V·h.
    """
    per_block = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
    return L * per_block + V * h + s * h + 2 * h + V * h


def llama_params(*, L: int, h: int, heads: int, kv: int, f: int, V: int, experts: int = 0) -> int:
    """Exact parameter count of this code's Llama / Mixtral layout (no biases anywhere).

    Per block: wq, wo h² each; wk, wv h·(kv·d) each with d = h/heads; 2 RMSNorm weights 2·h;
    dense SwiGLU 3·h·f, or MoE: E·3·h·f experts + h·E router.
    Outside blocks: embedding V·h, final RMSNorm h, untied output V·h.
    """
    d = h // heads
    attention = 2 * h * h + 2 * h * kv * d
    ffn = experts * 3 * h * f + h * experts if experts else 3 * h * f
    return L * (attention + ffn + 2 * h) + V * h + h + V * h


def test_gpt_param_formula_worked_example():
    """Oracle: hand count for L=1, h=4, f=16, V=10, s=8 (a model this small is built on CPU and counted)."""
    # block: 4·16 + 4·4 + 2·4·16 + 16 + 4 + 4·4 = 64 + 16 + 128 + 16 + 4 + 16 = 244
    # outside: 10·4 + 8·4 + 2·4 + 10·4 = 40 + 32 + 8 + 40 = 120  -> 364
    assert gpt_params(L=1, h=4, V=10, s=8, f=16) == 364
    assert n_params(ap.models.gpt(layers=1, hidden=4, heads=2, vocab=10, seq_len=8, ffn_hidden=16)) == 364


@pytest.mark.parametrize("name, published, source", [
    ("gpt3-175b", 175e9, "Brown et al. 2020, Table 2.1"),
    ("llama3-8b", 8.03e9, "Meta Llama 3 model card (8.03B)"),
    ("llama3-70b", 70.6e9, "Meta Llama 3 model card (70.6B)"),
    ("llama3-405b", 405.9e9, "Meta Llama 3.1 model card (405.9B)"),
    ("mixtral-8x7b", 46.7e9, "Jiang et al. 2024 (46.7B total parameters)"),
])
def test_named_config_param_counts(name, published, source):
    """Oracle: the architecture formula (exact) and the published total (within 1%: papers round, and GPT-3
    ties its embeddings while this layout has an untied head and a vocab padded to 51200)."""
    with torch.device("meta"):
        model = build_named(name)
    c = named_config(name)
    if name.startswith("gpt"):
        expected = gpt_params(L=c["layers"], h=c["hidden"], V=c["vocab"], s=c["seq_len"], f=c["ffn_hidden"])
    else:
        expected = llama_params(L=c["layers"], h=c["hidden"], heads=c["heads"], kv=c["kv_heads"],
                                f=c["ffn_hidden"], V=c["vocab"], experts=c.get("num_experts", 0))
    count = n_params(model)
    assert count == expected
    assert count == pytest.approx(published, rel=0.01), source


def test_llama3_8b_exact_count():
    """Oracle: llama3-8b worked by hand, compared with the model card's 8.03B.

    block: 2·4096² + 2·4096·1024 + 3·4096·14336 + 2·4096
         = 33,554,432 + 8,388,608 + 176,160,768 + 8,192 = 218,112,000;  x32 = 6,979,584,000
    embedding + head 2·128256·4096 = 1,050,673,152; final norm 4,096  -> 8,030,261,248
    """
    with torch.device("meta"):
        assert n_params(build_named("llama3-8b")) == 8_030_261_248


def test_named_configs_cite_a_source():
    """Oracle: house style (every number carries its source)."""
    for name, (factory, kwargs, source) in NAMED_CONFIGS.items():
        assert callable(factory) and kwargs and source, name


# ----------------------------------------------------------------------------------------- training on CPU
def tiny_batch(vocab: int, *, batch: int = 4, seq: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train_losses(model: torch.nn.Module, steps: int = 6, lr: float = 3e-3) -> list[float]:
    inputs, targets = tiny_batch(model.config.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def seeded(name: str, seed: int = 1234, **overrides) -> torch.nn.Module:
    model = build_named(name, **overrides)
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("name", ["gpt-tiny", "moe-tiny"])
def test_tiny_models_learn_a_fixed_batch(name):
    """Oracle: AdamW on one fixed batch must fit it: the loss falls, starting near ln(vocab) for a 0.02-std init."""
    losses = train_losses(seeded(name))
    # uniform prediction over 512 tokens: ln 512 = 6.238
    assert losses[0] == pytest.approx(math.log(512), abs=0.1)
    assert losses[-1] < losses[0] - 0.5
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("name", ["gpt-tiny", "moe-tiny"])
def test_seeded_runs_are_bit_identical(name):
    """Oracle: the same seed twice (house style: a fixed seed gives bit-identical losses)."""
    assert train_losses(seeded(name, seed=7), steps=3) == train_losses(seeded(name, seed=7), steps=3)
    a, b = seeded(name, seed=7), seeded(name, seed=8)
    assert not torch.equal(a.output.weight, b.output.weight)


@pytest.mark.parametrize("name, overrides", [("gpt-tiny", {}), ("gpt-tiny", {"attn_impl": "eager"}),
                                             ("moe-tiny", {})])
def test_meta_then_to_empty_equals_cpu_build(name, overrides):
    """Oracle: the model built on CPU with the same seed: meta -> to_empty -> init_weights(seed) restores every
    parameter and buffer (rotary table, causal mask), so the two give the same loss bit for bit."""
    with torch.device("meta"):
        meta_model = build_named(name, **overrides)
    meta_model.to_empty(device="cpu")
    meta_model.init_weights(42)
    cpu_model = seeded(name, seed=42, **overrides)
    for (n1, t1), (n2, t2) in zip(list(meta_model.named_parameters()) + list(meta_model.named_buffers()),
                                  list(cpu_model.named_parameters()) + list(cpu_model.named_buffers())):
        assert n1 == n2
        assert torch.equal(t1, t2), n1
    assert train_losses(meta_model, steps=2) == train_losses(cpu_model, steps=2)


# ----------------------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_backward_matches_gradcheck():
    """Oracle: torch.autograd.gradcheck (finite differences in float64) of the hand-written backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, w))


def test_rmsnorm_forward_matches_torch():
    """Oracle: F.rms_norm (torch's reference RMSNorm, Zhang & Sennrich 2019) in float64."""
    norm = RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-6), rtol=0, atol=1e-12)
    # worked example: x = [3, 4], w = 1, eps = 0: rms = sqrt((9 + 16)/2) = 3.5355 -> [0.8485, 1.1314]
    tiny = RMSNorm(2, eps=0.0).double()
    out = tiny(torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([3.0, 4.0], dtype=torch.float64) / math.sqrt(12.5))


def test_rmsnorm_saves_input_and_fp32_rstd_only():
    """Oracle: the fused-kernel memory the docstring promises: the bf16 input plus one fp32 value per token."""
    norm = RMSNorm(64).to(torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = norm(x)
    activations = [t for t in saved if t.data_ptr() != norm.weight.data_ptr()]
    # x: 2·8·64·2 B = 2048 B; rstd: 2·8 tokens x 4 B = 64 B
    assert sorted(t.numel() * t.element_size() for t in activations) == [64, 2048]
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- RoPE
def test_rope_frequencies_worked_example():
    """Oracle: Su et al. 2021 eq. 34: angle(p, i) = p · theta^(-2i/d)."""
    freqs = rope_frequencies(4, 3, theta=10000.0)  # d=4: inv_freq = [1, 10000^-0.5 = 0.01]
    assert freqs.shape == (3, 2, 2)
    torch.testing.assert_close(freqs[2, 0], torch.tensor([math.cos(2.0), math.sin(2.0)]))
    torch.testing.assert_close(freqs[2, 1], torch.tensor([math.cos(0.02), math.sin(0.02)]))


def test_rope_is_identity_at_position_zero_and_preserves_norms():
    """Oracle: a rotation: angle 0 at position 0, and |R x| = |x| for every pair and so every head vector."""
    x = torch.randn(2, 16, 4, 8, dtype=torch.float64)
    freqs = rope_frequencies(8, 16).double()
    out = apply_rope(x, freqs)
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    pair_norms = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norms(out), pair_norms(x))
    assert not torch.allclose(out[:, 1:], x[:, 1:])


def test_rope_scores_depend_only_on_relative_position():
    """Oracle: Su et al. 2021 eq. 16: <R_m q, R_n k> = <q, R_(n-m) k>, a function of n - m only."""
    d, s = 8, 12
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    freqs = rope_frequencies(d, s).double()
    rq = apply_rope(q.expand(1, s, 1, d), freqs)[0, :, 0]  # the same q at every position
    rk = apply_rope(k.expand(1, s, 1, d), freqs)[0, :, 0]
    scores = rq @ rk.t()  # [m, n]
    for offset in (0, 3, -2):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal))


# ----------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("kv_heads, rope", [(4, False), (2, True)])
def test_eager_attention_matches_sdpa(kv_heads, rope):
    """Oracle: F.scaled_dot_product_attention (causal, dropout 0) on CPU; same weights, float64, fwd and bwd."""
    torch.manual_seed(0)
    sdpa = Attention(32, 4, kv_heads, rope=rope, bias=True, impl="sdpa", max_seq_len=16).double()
    eager = Attention(32, 4, kv_heads, rope=rope, bias=True, impl="eager", max_seq_len=16).double()
    eager.load_state_dict(sdpa.state_dict())
    freqs = rope_frequencies(8, 16).double() if rope else None
    x = torch.randn(2, 10, 32, dtype=torch.float64, requires_grad=True)  # s=10 < max_seq_len: mask is sliced
    out_sdpa, out_eager = sdpa(x, freqs), eager(x, freqs)
    torch.testing.assert_close(out_eager, out_sdpa, rtol=1e-10, atol=1e-12)
    grad_sdpa = torch.autograd.grad(out_sdpa.square().sum(), x)[0]
    grad_eager = torch.autograd.grad(out_eager.square().sum(), x)[0]
    torch.testing.assert_close(grad_eager, grad_sdpa, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_is_causal(impl):
    """Oracle: causality: changing token t leaves the outputs at positions < t unchanged."""
    attn = Attention(16, 2, impl=impl, max_seq_len=8).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    y = x.clone()
    y[:, 5] += 1.0
    a, b = attn(x), attn(y)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


# ----------------------------------------------------------------------------------------- MoE
def make_moe(hidden=16, ffn=24, experts=4, top_k=2, seed=0) -> MoE:
    torch.manual_seed(seed)
    return MoE(hidden, ffn, experts, top_k).double()


def test_moe_routing_picks_top_k_distinct_experts():
    """Oracle: torch.topk of softmax(router logits) per token, renormalised over the chosen k (Mixtral eq. 1)."""
    moe = make_moe()
    tokens = torch.randn(20, 16, dtype=torch.float64)
    experts, weights = moe.route(tokens)
    assert experts.shape == weights.shape == (20, 2)
    assert all(len(set(row.tolist())) == 2 for row in experts)
    probs = (tokens @ moe.router.weight.t()).softmax(-1)
    top, idx = probs.topk(2, dim=-1)
    assert torch.equal(experts, idx)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(20, dtype=torch.float64))


def test_moe_with_equal_logits_and_identical_experts_is_the_dense_swiglu():
    """Oracle: a dense SwiGLU. All router logits equal -> each chosen expert weighs 1/k; with every expert a copy
    of one SwiGLU, sum over k of (1/k)·SwiGLU(x) = SwiGLU(x) whatever experts the tie-break picks."""
    moe = make_moe(top_k=3)
    dense = SwiGLU(16, 24).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        for stacked, linear in ((moe.w1, dense.w1), (moe.w3, dense.w3), (moe.w2, dense.w2)):
            stacked.copy_(linear.weight.expand_as(stacked))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    _, weights = moe.route(x.reshape(-1, 16))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))
    torch.testing.assert_close(moe(x), dense(x))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_moe_matches_naive_per_token_loop(top_k):
    """Oracle: for each token, sum over its top-k experts of (renormalised weight) · SwiGLU_e(token)."""
    moe = make_moe(top_k=top_k)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    expected = torch.zeros_like(x).reshape(-1, 16)
    for t, token in enumerate(x.reshape(-1, 16)):
        probs = (moe.router.weight @ token).softmax(-1)
        weights, chosen = probs.topk(top_k)
        for w, e in zip(weights / weights.sum(), chosen.tolist()):
            hidden = F.silu(moe.w1[e] @ token) * (moe.w3[e] @ token)
            expected[t] += w * (moe.w2[e] @ hidden)
    # the router's softmax runs in fp32 (route() calls .float()), so float64 agrees to ~1e-8, not 1e-15
    torch.testing.assert_close(moe(x), expected.view_as(x), rtol=1e-5, atol=1e-6)


def test_moe_gradcheck_in_float64():
    """Oracle: torch.autograd.gradcheck (finite differences in float64) of the MoE layer w.r.t. its input.
    Finite differences of 1e-6 cannot see through a routing softmax rounded to fp32."""
    moe = make_moe(hidden=8, ffn=12)
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(moe, (x,))


def test_moe_expert_counts_balanced_on_meta_and_measured_on_cpu():
    """Oracle: divmod for meta (T·k rows spread evenly, remainder to the first experts); bincount on CPU."""
    moe = make_moe()
    # 5 tokens x top-2 = 10 rows over 4 experts: 10 = 4·2 + 2 -> [3, 3, 2, 2]
    assert moe.expert_counts(torch.empty(10, dtype=torch.long, device="meta")) == [3, 3, 2, 2]
    assert moe.expert_counts(torch.tensor([0, 0, 3, 1, 0])) == [3, 1, 0, 1]


@pytest.mark.parametrize("top_k", [0, 5])
def test_moe_rejects_top_k_outside_1_to_experts(top_k):
    """Limit case: top_k must be in [1, num_experts]."""
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 8, 4, top_k)


# ----------------------------------------------------------------------------------------- loader
MODEL_PY = """
import autoplan as ap

CONFIG = {"seq_len": 32}

def build_model():
    return ap.models.gpt(layers=2, hidden=32, heads=2, vocab=100, seq_len=64)
"""


def write(tmp_path, text: str, name: str = "model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_load_builtin_name_on_meta():
    """Oracle: the named config: same parameter count as a direct build, config carried with the overrides."""
    loaded = load_model("gpt-tiny", layers=2)
    assert loaded.name == "gpt-tiny"
    assert all(p.is_meta for p in loaded.module.parameters())
    assert len(loaded.module.layers) == 2
    assert loaded.seq_len == 64 and loaded.config["layers"] == 2


def test_load_model_py_with_config(tmp_path):
    """Oracle: the file's own CONFIG (seq_len taken from it, not from the model) and build_model() on meta."""
    path = write(tmp_path, MODEL_PY)
    loaded = load_model(str(path))
    assert loaded.name == str(path)
    assert loaded.seq_len == 32
    assert all(p.is_meta for p in loaded.module.parameters())
    assert n_params(loaded.module) == gpt_params(L=2, h=32, V=100, s=64, f=128)


def test_load_model_py_without_config_has_no_seq_len(tmp_path):
    """Limit case: CONFIG is optional; then seq_len is unknown (None)."""
    path = write(tmp_path, "import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n")
    assert load_model(str(path)).seq_len is None


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_model_file(tmp_path):
    """Limit case: a path that does not exist -> ModelLoadError naming it."""
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path / "nope.py"))
    assert_one_line(err, "not found", "nope.py")


def test_model_file_without_build_model(tmp_path):
    """Limit case: a model.py with no build_model() -> ModelLoadError naming the function."""
    path = write(tmp_path, "CONFIG = {'seq_len': 8}\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert_one_line(err, "build_model()")


def test_model_file_raising_at_import(tmp_path):
    """Limit case: the user's module raises while importing -> one-line ModelLoadError with the error type."""
    path = write(tmp_path, "import torch\nraise RuntimeError('boom at import')\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert_one_line(err, "RuntimeError", "boom at import", "importing")


def test_model_file_with_syntax_error(tmp_path):
    """Limit case: a SyntaxError in model.py -> one-line ModelLoadError."""
    path = write(tmp_path, "def build_model(:\n    pass\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert_one_line(err, "SyntaxError")


def test_build_model_raising(tmp_path):
    """Limit case: build_model() raises -> one-line ModelLoadError with the error type and message."""
    path = write(tmp_path, "def build_model():\n    raise ValueError('bad width')\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert_one_line(err, "build_model() raised", "ValueError", "bad width")


def test_build_model_raising_multiline_message_is_still_one_line(tmp_path):
    """Oracle: loader.py's own promise ('report it in one line'), with an error message of two lines
    (torch and pydantic errors often are)."""
    path = write(tmp_path, "def build_model():\n    raise RuntimeError('shape mismatch\\n  at layer 3')\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert_one_line(err, "RuntimeError", "shape mismatch")


def test_build_model_returning_non_module(tmp_path):
    """Limit case: build_model() must return an nn.Module."""
    path = write(tmp_path, "def build_model():\n    return 42\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert_one_line(err, "int", "torch.nn.Module")


def test_unknown_builtin_name_lists_the_names():
    """Limit case: a typo of a built-in name -> ModelLoadError listing every built-in name."""
    with pytest.raises(ModelLoadError) as err:
        load_model("llama3-7b")
    assert_one_line(err, "llama3-7b", *NAMED_CONFIGS)
