import pytest
import torch

import autoplan as ap


@pytest.fixture(scope="session")
def gpt_eager_profile():
    """One GPT layer in Megatron-LM's layout (explicit softmax attention, dropout 0.1), traced on meta.
    s=512, b=1, h=1024, a=16: the setting of Korthikanti et al. 2022's formulas."""
    with torch.device("meta"):
        model = ap.models.gpt(layers=2, hidden=1024, heads=16, vocab=1000, seq_len=512, dropout=0.1,
                              attn_impl="eager")
    return ap.profile_model(model, attention="eager")


@pytest.fixture(scope="session")
def llama_tiny_profile():
    return ap.profile_model("gpt-tiny")


@pytest.fixture(scope="session")
def moe_tiny_profile():
    return ap.profile_model("moe-tiny")
