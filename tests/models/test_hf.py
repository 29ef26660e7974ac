"""Hugging Face configs as models: built by transformers without downloads, laid out as embed -> layers ->
norm -> output (autoplan.models.hf). Oracles: transformers' own parameter count and its own forward."""

import copy
import json
from pathlib import Path

import pytest
import torch

from autoplan.errors import ModelLoadError
from autoplan.models.loader import load_model

transformers = pytest.importorskip("transformers")
from autoplan.models.hf import HFCausalLM, hf_config  # noqa: E402

CONFIGS = Path(__file__).parent.parent / "hf_configs"
TINY = ["llama", "gpt2", "mixtral", "qwen2_moe", "qwen2"]


def _transformers_model(name: str, device: str = "meta"):
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(hf_config(str(CONFIGS / f"{name}.json")))


@pytest.mark.parametrize("name", TINY)
def test_loaded_as_the_reference_layout_with_every_parameter(name):
    loaded = load_model(str(CONFIGS / f"{name}.json"), device="meta")
    model = loaded.module
    assert isinstance(model, HFCausalLM)
    assert list(model.layers) == ["0", "1"] and model.embed is not None and model.norm is not None
    params = sum(p.numel() for p in model.parameters())  # a tied weight once, as transformers counts it
    assert params == _transformers_model(name).num_parameters()
    assert loaded.config == {"seq_len": 64, "vocab": 512, "hidden": 64}


def test_a_model_folder_and_a_seq_len_override(tmp_path):
    (tmp_path / "config.json").write_text((CONFIGS / "llama.json").read_text())
    loaded = load_model(str(tmp_path), device="meta", seq_len=32)
    assert loaded.seq_len == 32 and loaded.module.config.seq_len == 32


def test_gpt2_keeps_its_head_tied_to_the_token_table():
    model = load_model(str(CONFIGS / "gpt2.json"), device="meta").module
    assert model.output.weight is model.embed.tok.weight


@pytest.mark.parametrize("body, words", [({"vocab_size": 8}, "model_type"),
                                         ({"model_type": "no-such-model"}, "no-such-model")])
def test_a_bad_config_is_one_line(tmp_path, body, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(body))
    with pytest.raises(ModelLoadError, match=words) as err:
        load_model(str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", TINY)
def test_the_layout_computes_what_transformers_computes(name):
    """Oracle: transformers' own forward (logits) on the same weights, on CPU."""
    torch.manual_seed(0)
    original = _transformers_model(name, device="cpu").eval()
    wrapped = HFCausalLM(copy.deepcopy(original)).eval()
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected = original(tokens, use_cache=False).logits
        got = wrapped(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_init_weights_is_deterministic_and_sets_the_rotary_tables():
    first = load_model(str(CONFIGS / "llama.json"), device="meta").module
    second = load_model(str(CONFIGS / "llama.json"), device="meta").module
    for model in (first, second):
        model.to_empty(device="cpu")
        model.init_weights(seed=3)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    reference = _transformers_model("llama", device="cpu").model.rotary_emb.inv_freq
    torch.testing.assert_close(first.rotary.inv_freq, reference)
    norm = first.layers["0"].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))


def test_a_model_type_not_checked_here_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mistral", "vocab_size": 512, "hidden_size": 64,
                                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "max_position_embeddings": 64, "sliding_window": 16}))
    notes = load_model(str(path)).module.notes
    assert len(notes) == 2 and "mistral" in notes[0] and "sliding-window" in notes[1]
