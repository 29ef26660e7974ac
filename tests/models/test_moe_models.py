"""The MoE refinements (fine-grained and shared experts, dense first layers, sigmoid routing, Qwen3's head_dim
and qk-norm, DeepSeek's MLA) and the published MoE models built from them."""

import math

import pytest
import torch
import torch.nn.functional as F

import autoplan as ap
from autoplan.models import build_named
from autoplan.models.layers import MoE, SwiGLU, apply_rope, rope_frequencies
from autoplan.models.mla import MLAttention

# name -> (total, active) parameters as published (model cards / papers cited in NAMED_CONFIGS), and the
# relative tolerance their rounding allows (141B: 0.5B of rounding = 0.4%)
PUBLISHED = {
    "mixtral-8x22b": (141e9, 39e9, 0.01),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, 0.02),
    "qwen3-235b-a22b": (235e9, 22e9, 0.01),
    "deepseek-v3": (671e9, 37e9, 0.015),
}


def _counts(name: str) -> tuple[int, int]:
    """(total, active) of the built model: active = all but the routed experts' weights, plus top_k/E of them."""
    with torch.device("meta"):
        model = build_named(name)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    return total, total - experts + experts * model.config.top_k // model.config.num_experts


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_moe_models_have_their_published_sizes(name):
    """Oracle: the totals and active parameters their authors publish (differences stated in the source:
    DeepSeek-V3's 671B exclude its 14B multi-token-prediction module, as does this model)."""
    total, active = _counts(name)
    published_total, published_active, tolerance = PUBLISHED[name]
    assert total == pytest.approx(published_total, rel=tolerance)
    assert active == pytest.approx(published_active, rel=tolerance * 2)


def test_qwen3_30b_count_is_exact():
    """Oracle: the closed form of Qwen3-30B-A3B's config.json, term by term.
    attention: q 2048 x (32·128), k and v 2048 x (4·128) each, o (32·128) x 2048, q/k norms 128 each;
    MoE: 128 experts x 3 x 2048 x 768 + router 2048 x 128; two block norms 2·2048;
    outside: embedding and untied head 151936 x 2048 each, final norm 2048."""
    h, heads, kv, d, f, e, vocab, layers = 2048, 32, 4, 128, 768, 128, 151936, 48
    attention = h * heads * d * 2 + 2 * h * kv * d + 2 * d
    block = attention + e * 3 * h * f + h * e + 2 * h
    assert _counts("qwen3-30b-a3b")[0] == layers * block + 2 * vocab * h + h


@pytest.mark.parametrize("name", ["deepseek-tiny", "qwen3-30b-a3b"])
def test_profiler_counts_every_parameter(name):
    """Oracle: the module's own parameter count; routed experts are the profile's expert parameters."""
    profile = ap.profile_model(name)
    with torch.device("meta"):
        model = build_named(name)
    assert profile.total_params == sum(p.numel() for p in model.parameters())
    assert sum(layer.expert_params for layer in profile.layers) == \
        sum(p.numel() for p in model.parameters() if p.dim() == 3)
    assert not profile.notes


def test_dense_first_layers_and_fine_grained_experts():
    """Oracle: the config: block 0 dense SwiGLU of ffn_hidden, later blocks experts of moe_ffn_hidden and one
    shared expert of the same width."""
    model = build_named("deepseek-tiny")
    first, later = model.layers["0"].feed_forward, model.layers["1"].feed_forward
    assert isinstance(first, SwiGLU) and first.w1.out_features == 128
    assert isinstance(later, MoE) and tuple(later.w1.shape) == (8, 32, 64)
    assert later.shared.w1.out_features == 32


def test_shared_expert_adds_to_the_routed_output():
    """Oracle: the routed experts alone (same weights, no shared expert) plus the shared SwiGLU."""
    torch.manual_seed(0)
    moe = MoE(16, 8, 4, 2, shared_ffn_hidden=8, score="sigmoid", routed_scale=2.5)
    routed = MoE(16, 8, 4, 2, score="sigmoid", routed_scale=2.5)
    routed.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared.")})
    x = torch.randn(2, 5, 16)
    assert torch.allclose(moe(x), routed(x) + moe.shared(x), atol=1e-6)


def test_sigmoid_routing_weights_sum_to_the_routed_scale():
    """Oracle: DeepSeek-V3 eq. 13-15: top-k sigmoid affinities normalised over the k, times the scale."""
    torch.manual_seed(0)
    moe = MoE(16, 8, 8, 3, score="sigmoid", routed_scale=2.5)
    tokens = torch.randn(7, 16)
    experts, weights = moe.route(tokens)
    assert torch.allclose(weights.sum(-1), torch.full((7,), 2.5))
    affinity = torch.sigmoid(tokens @ moe.router.weight.t())
    assert torch.equal(experts, affinity.topk(3, dim=-1).indices)


def _reference_mla(m: MLAttention, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """MLA written out head by head with an explicit causal softmax (DeepSeek-V2, eq. 9-19)."""
    b, s, _ = x.shape
    q = m.wq_b(m.q_norm(m.wq_a(x))).view(b, s, m.heads, -1)
    latent, k_rope = m.wkv_a(x).split([m.kv_lora_rank, m.rope_dim], dim=-1)
    kv = m.wkv_b(m.kv_norm(latent)).view(b, s, m.heads, -1)
    k_rope = apply_rope(k_rope[:, :, None, :], freqs)[:, :, 0]
    outs = []
    for head in range(m.heads):
        qh = torch.cat([q[:, :, head, :m.nope], apply_rope(q[:, :, head:head + 1, m.nope:], freqs)[:, :, 0]], -1)
        kh = torch.cat([kv[:, :, head, :m.nope], k_rope], -1)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(m.nope + m.rope_dim)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(scores.softmax(-1) @ kv[:, :, head, m.nope:])
    return m.wo(torch.cat(outs, dim=-1))


def test_mla_matches_its_written_out_form():
    """Oracle: _reference_mla, the equations head by head."""
    torch.manual_seed(0)
    m = MLAttention(32, 4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    x, freqs = torch.randn(2, 7, 32), rope_frequencies(4, 7, 10000.0)
    assert torch.allclose(m(x, freqs), _reference_mla(m, x, freqs), atol=1e-5)


def test_qwen3_attention_head_dim_and_qk_norm():
    """Oracle: Qwen3-30B-A3B's config: 32 heads of 128 on a 2048 hidden, a norm of 128 on queries and keys."""
    with torch.device("meta"):
        attention = build_named("qwen3-30b-a3b", layers=1).layers["0"].attention
    assert attention.wq.out_features == 32 * 128 and attention.wk.out_features == 4 * 128
    assert attention.q_norm.weight.shape == (128,) and attention.k_norm.weight.shape == (128,)


def test_deepseek_tiny_trains():
    """Oracle: a few AdamW steps on one repeated batch lower the loss (the model is trainable end to end)."""
    torch.manual_seed(0)
    model = build_named("deepseek-tiny")
    model.init_weights(seed=0)
    tokens = torch.randint(0, 512, (2, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_moe_rejects_unknown_refinements():
    """Limit case: a misspelt keyword is an error, not silently ignored."""
    with pytest.raises(TypeError, match="shared_expert"):
        ap.models.moe(layers=1, hidden=8, heads=2, ffn_hidden=8, vocab=8, seq_len=4, num_experts=2, top_k=1,
                      shared_expert=1)


def test_experts_match_per_expert_indexing_and_write_the_stacked_gradient_once():
    """run_experts takes each stacked weight's slices once: the same outputs and gradients as indexing w[e]
    per expert (the written-out form), and one stacked-gradient write per weight in backward, where
    indexing wrote one zero-filled stack per expert (select_backward)."""
    torch.manual_seed(0)
    moe = MoE(hidden=16, ffn_hidden=24, num_experts=4, top_k=2)
    grouped, counts = torch.randn(11, 16, requires_grad=True), [3, 0, 5, 3]
    out = moe.run_experts(grouped, counts)
    out.square().sum().backward()
    got = [grouped.grad] + [w.grad for w in (moe.w1, moe.w3, moe.w2)]
    weights = [w.detach().clone().requires_grad_() for w in (moe.w1, moe.w3, moe.w2)]
    rows_in = grouped.detach().clone().requires_grad_()
    outputs, start = [], 0
    for e, count in enumerate(counts):
        rows = rows_in[start:start + count]
        outputs.append((F.silu(rows @ weights[0][e].t()) * (rows @ weights[1][e].t())) @ weights[2][e].t())
        start += count
    reference = torch.cat(outputs)
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference)
    for mine, theirs in zip(got, [rows_in.grad] + [w.grad for w in weights]):
        torch.testing.assert_close(mine, theirs)
    seen = []

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func._opname)
            return func(*args, **(kwargs or {}))

    moe.zero_grad()
    out = moe.run_experts(grouped, counts)
    with Ops():
        out.square().sum().backward()
    assert "select_backward" not in seen and "slice_backward" not in seen and seen.count("stack") == 3
