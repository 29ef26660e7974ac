"""Profiles of Hugging Face models. Oracles: autoplan's built-in model of the same shape (same parameters,
same FLOPs), transformers' parameter count, and the formula 6·N + 12·L·h·s (benchmarks.hf_models)."""

from pathlib import Path

import pytest
import torch
from torch import nn

import autoplan as ap

transformers = pytest.importorskip("transformers")
from autoplan.models.hf import hf_config  # noqa: E402
from benchmarks.hf_models import formula_flops_per_token  # noqa: E402

CONFIGS = Path(__file__).parent.parent / "hf_configs"
SEQ = 64
SAME_SHAPE = {
    "llama": dict(factory=ap.models.llama, layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=512),
    "mixtral": dict(factory=ap.models.moe, layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=512,
                    num_experts=4, top_k=2),
}


def _profile(name: str, **kwargs):
    return ap.profile_model(str(CONFIGS / f"{name}.json"), **kwargs)


@pytest.mark.parametrize("name", list(SAME_SHAPE))
def test_same_numbers_as_the_built_in_model_of_the_same_shape(name):
    kwargs = dict(SAME_SHAPE[name])
    factory = kwargs.pop("factory")
    with torch.device("meta"):
        builtin = ap.profile_model(factory(seq_len=SEQ, **kwargs))
    profile = _profile(name)
    assert profile.total_params == builtin.total_params
    assert profile.train_flops_per_sequence == builtin.train_flops_per_sequence
    assert [layer.kind for layer in profile.layers] == [layer.kind for layer in builtin.layers]
    assert (profile.num_blocks, profile.num_heads, profile.num_kv_heads, profile.num_experts, profile.top_k) == \
        (builtin.num_blocks, builtin.num_heads, builtin.num_kv_heads, builtin.num_experts, builtin.top_k)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "qwen2_moe", "qwen2"])
def test_parameters_exact_and_flops_within_2_percent_of_the_formula(name):
    profile = _profile(name)
    config = hf_config(str(CONFIGS / f"{name}.json"))
    with torch.device("meta"):
        expected_params = transformers.AutoModelForCausalLM.from_config(config).num_parameters()
    assert profile.total_params == expected_params
    per_token = profile.train_flops_per_sequence / SEQ
    assert per_token == pytest.approx(formula_flops_per_token(config, SEQ), rel=0.02)


def test_moe_experts_cost_the_routed_tokens_on_meta():
    """Qwen-MoE: the experts' loop runs no tokens on meta, yet each expert is costed for tokens·top_k/E;
    its attention is attention (not moe, whatever the class name says)."""
    profile = _profile("qwen2_moe")
    moe = [layer for layer in profile.layers if layer.kind == "moe"]
    assert [layer.kind for layer in profile.layers if layer.block == 0] == ["attention", "moe"]
    assert all((layer.num_experts, layer.top_k) == (4, 2) for layer in moe)
    h, ffn, shared = 64, 32, 64
    # routed: 64 tokens · top_k 2 · 3 GEMMs of h x ffn; shared expert 3 GEMMs of h x shared; gates h x 1, h x 4
    expected = 2 * (SEQ * 2 * 3 * h * ffn + SEQ * 3 * h * shared + SEQ * h * 1 + SEQ * h * 4)
    assert moe[0].fwd_flops == expected
    assert moe[0].expert_params == 4 * 3 * h * ffn
    assert profile.notes == []  # nothing it could not recognize


def test_tied_head_is_counted_once_and_named():
    profile = _profile("gpt2")
    head = next(layer for layer in profile.layers if layer.kind == "head")
    assert head.params == 0 and head.tied_params == 512 * 64 and head.fwd_flops > 0
    assert any("tied" in note for note in profile.notes)


def test_gpt2_dropout_is_traced():
    """Dropout 0.1 (GPT-2's default) keeps its masks for backward: more activation bytes than without."""
    with_dropout, without = _profile("gpt2_dropout"), _profile("gpt2")
    assert with_dropout.layers[1].activation_bytes > without.layers[1].activation_bytes


def test_a_transformers_module_profiles_as_its_config_does():
    with torch.device("meta"):
        module = transformers.AutoModelForCausalLM.from_config(hf_config(str(CONFIGS / "mixtral.json")))
    from_module = ap.profile_model(module, seq_len=SEQ)
    from_file = _profile("mixtral")
    assert from_module.total_params == from_file.total_params
    assert from_module.train_flops_per_sequence == from_file.train_flops_per_sequence
    assert type(module.model.layers[0].mlp.experts).__name__ == "MixtralExperts"  # the user's module unchanged


class _Nested(nn.Module):
    """Blocks two levels down (as transformers nests them), no transformers involved."""

    def __init__(self):
        super().__init__()
        self.body = nn.Module()
        self.body.embed = nn.Embedding(128, 32)
        self.body.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32)) for _ in range(3))
        self.head = nn.Linear(32, 128, bias=False)

    def forward(self, tokens):
        x = self.body.embed(tokens)
        for block in self.body.blocks:
            x = x + block(x)
        return self.head(x)


def test_blocks_are_found_wherever_nested():
    with torch.device("meta"):
        model = _Nested()
    profile = ap.profile_model(model, seq_len=16)
    assert profile.num_blocks == 3
    assert not any("no repeated blocks" in note for note in profile.notes)


def test_what_is_not_found_is_named():
    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 64))
    profile = ap.profile_model(model, seq_len=8)
    assert any("no repeated blocks" in note for note in profile.notes)


class _BlockWithOwnWork(nn.Module):
    """A block that multiplies by its own weight outside its children: profiled as one layer."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)
        self.mix = nn.Parameter(torch.empty(16, 16))

    def forward(self, x):
        return x + self.proj(self.norm(x)) @ self.mix


class _OwnWork(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList(_BlockWithOwnWork() for _ in range(2))

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x)
        return x


def test_a_block_kept_whole_counts_its_parameters_once():
    with torch.device("meta"):
        model = _OwnWork()
    profile = ap.profile_model(model, seq_len=8)
    assert [layer.name for layer in profile.layers] == ["embed", "layers.0", "layers.1"]
    assert profile.total_params == sum(p.numel() for p in model.parameters())
    assert not any(layer.tied_params for layer in profile.layers)
