"""torchtitan's models are refused in one line by the profiler, the dry run and the executor (why:
autoplan/models/titan.py). Runs where torchtitan and what its llama3 imports are installed (it needs
triton, which a CPU build of torch lacks); skipped elsewhere, as in CI."""

import pytest
import torch

import autoplan as ap
from autoplan.errors import ModelLoadError
from autoplan.executor import apply

llama3 = pytest.importorskip("torchtitan.models.llama3", reason="torchtitan (and triton) not installed")


@pytest.fixture(scope="module")
def titan_llama():
    """Oracle for the reason: torchtitan 0.3.0 offers no sdpa backend for its language models."""
    with pytest.raises(ValueError, match="sdpa is no longer supported"):
        llama3.llama3_configs["debugmodel"](attn_backend="sdpa")
    with torch.device("meta"):
        return llama3.llama3_configs["debugmodel"](attn_backend="flex").build()


@pytest.mark.parametrize("call", [
    lambda model: ap.profile_model(model, seq_len=64),
    lambda model: ap.dryrun(model, ap.Plan(dp=2, global_batch_size=2), gpus=2, seq_len=64),
    lambda model: apply(model, ap.Plan(global_batch_size=1)),
], ids=["profile", "dryrun", "apply"])
def test_torchtitan_model_is_refused_in_one_line(titan_llama, call):
    with pytest.raises(ModelLoadError, match="is a torchtitan .* model, which autoplan does not read") as err:
        call(titan_llama)
    assert "\n" not in str(err.value)
