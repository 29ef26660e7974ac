"""Tensor-parallel layouts for models autoplan did not write: derived from Linear names, or refused in one
line asking for a tp_plan; pipeline splits only of the embed -> layers -> norm -> output layout."""

import pytest
import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from autoplan.errors import InvalidPlanError
from autoplan.executor.derived_tp import derived_block_layout, regroup_fused_qkv, retie, tied_groups
from autoplan.executor.pipeline import split_model
from autoplan.executor.tensor_parallel import apply_tensor_parallel
from autoplan.schema import Plan


class _Attention(nn.Module):
    def __init__(self, hidden=8, heads=2):
        super().__init__()
        self.num_heads, self.split_size = heads, hidden
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = _Attention()
        self.mlp = nn.Module()
        self.mlp.up_proj, self.mlp.down_proj = nn.Linear(8, 16), nn.Linear(16, 8)


def test_layout_from_linear_names():
    layout = derived_block_layout(_Block(), sequence_parallel=True, tp=2)
    assert isinstance(layout["attn.c_attn"], ColwiseParallel) and isinstance(layout["mlp.up_proj"], ColwiseParallel)
    assert isinstance(layout["attn.c_proj"], RowwiseParallel) and isinstance(layout["mlp.down_proj"], RowwiseParallel)
    assert isinstance(layout["norm"], SequenceParallel)


def test_an_unknown_linear_asks_for_a_tp_plan():
    block = _Block()
    block.mlp.mystery = nn.Linear(8, 8)
    with pytest.raises(InvalidPlanError, match="mystery.*tp_plan") as err:
        derived_block_layout(block, sequence_parallel=False, tp=2)
    assert "\n" not in str(err.value)


def test_fused_qkv_is_regrouped_by_heads():
    """Rank r's contiguous half of the regrouped output is [q_r, k_r, v_r]: the heads of rank r."""
    block = _Block()
    before = block.attn.c_attn.weight.detach().clone()
    regroup_fused_qkv(block, tp=2)
    q, k, v = before.split(8)
    rank0 = torch.cat([q[:4], k[:4], v[:4]])
    assert torch.equal(block.attn.c_attn.weight[:12], rank0)
    assert block.attn.split_size == 4


class _LookAlike(nn.Module):
    """embed / layers attributes, but not the reference blocks and no tp_plan."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleDict({"0": nn.Linear(8, 8)})


def test_a_look_alike_model_asks_for_a_tp_plan():
    with pytest.raises(InvalidPlanError, match="tp_plan"):
        apply_tensor_parallel(_LookAlike(), None, sequence_parallel=False)


def test_a_pipeline_needs_the_whole_layout():
    with pytest.raises(InvalidPlanError, match="embed -> layers -> norm -> output"):
        split_model(_LookAlike(), Plan(pp=2, global_batch_size=2, micro_batch_size=1), 0)


def test_tied_parameters_are_found_and_retied():
    model = nn.Module()
    model.embed, model.head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
    model.head.weight = model.embed.weight
    groups = tied_groups(model)
    assert groups == [["embed.weight", "head.weight"]]
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())  # what parallelize_module does
    retie(model, groups)
    assert model.head.weight is model.embed.weight
