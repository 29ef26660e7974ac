"""Tensor parallelism (Megatron column/row split) with optional sequence parallelism, as DTensor layouts.

The layout is data: a dict from module path to a torch ParallelStyle, derived from the reference models'
block structure (attention wq/wk/wv column-parallel, wo row-parallel; MLP/SwiGLU w1/w3 column, w2 row;
vocabulary-parallel embedding and output). A user's model.py may define `tp_plan(model, sequence_parallel)`
returning its own dict; the executor then uses that instead.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from autoplan.errors import InvalidPlanError
from autoplan.executor.derived_tp import (block_inputs_to_gather, derived_block_layout, gather_sequence_before,
                                         regroup_fused_qkv, retie, tied_groups)
from autoplan.support import MOE_TP


def block_layout(block: nn.Module, *, sequence_parallel: bool) -> dict:
    """{relative module path: ParallelStyle} for one transformer block of the reference models."""
    if hasattr(block.feed_forward, "num_experts"):
        raise InvalidPlanError(MOE_TP)
    ffn_cols = [n for n in ("w1", "w3") if hasattr(block.feed_forward, n)]
    out = Shard(1) if sequence_parallel else Replicate()
    layout = {f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")}
    layout["attention.wo"] = RowwiseParallel(output_layouts=out)
    layout.update({f"feed_forward.{n}": ColwiseParallel() for n in ffn_cols})
    layout["feed_forward.w2"] = RowwiseParallel(output_layouts=out)
    if sequence_parallel:  # norms on sequence shards; gather the sequence before attention / MLP
        layout["attention_norm"] = SequenceParallel()
        layout["ffn_norm"] = SequenceParallel()
        layout["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None),
                                                 desired_input_layouts=(Replicate(), None))
        layout["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return layout


def model_layout(model: nn.Module, *, sequence_parallel: bool, blocks=None) -> dict:
    """The reference transformer, or one pipeline stage of it (parts a stage lacks are None):
    embedding, every block it holds, final norm, output. With SP, a stage passes the sequence-sharded
    activation on to the next; the first stage splits it after the embedding. `blocks(block)` gives a
    block's layout (default: the reference blocks')."""
    blocks = blocks or (lambda block: block_layout(block, sequence_parallel=sequence_parallel))
    layout = {}
    if model.embed is not None:
        layout["embed.tok"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if sequence_parallel:  # positions are added on the full sequence, then it is split
            layout["embed"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    if model.norm is not None and sequence_parallel:
        layout["norm"] = SequenceParallel()
    if model.output is not None:
        layout["output"] = ColwiseParallel(input_layouts=Shard(1) if sequence_parallel else Replicate(),
                                           output_layouts=Replicate())
    for name, block in model.layers.items():
        layout.update({f"layers.{name}.{path}": style for path, style in blocks(block).items()})
    return layout


def _is_reference(model: nn.Module) -> bool:
    blocks = list(getattr(model, "layers", {}).values()) if isinstance(getattr(model, "layers", None), nn.ModuleDict) \
        else []
    return hasattr(model, "embed") and all(hasattr(b, "attention") and hasattr(b, "feed_forward") for b in blocks)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool,
                          user_plan=None) -> None:
    """Split the model's weights over `tp_mesh` (in place). Tied parameters stay tied."""
    ties = tied_groups(model)
    if user_plan is not None:
        layout = user_plan(model, sequence_parallel)
    elif _is_reference(model) and not getattr(model, "is_foreign", False):
        layout = model_layout(model, sequence_parallel=sequence_parallel)
    elif getattr(model, "is_foreign", False):
        tp = tp_mesh.size()
        for block in model.layers.values():
            regroup_fused_qkv(block, tp)
        layout = model_layout(model, sequence_parallel=sequence_parallel, blocks=lambda block: derived_block_layout(
            block, sequence_parallel=sequence_parallel, tp=tp))
        if sequence_parallel:
            model.sequence_shards = tp
            for block in model.layers.values():
                for child in block_inputs_to_gather(block):
                    gather_sequence_before(child, tp_mesh)
    else:
        raise InvalidPlanError("tp > 1 needs a tensor-parallel layout: this model is not one of autoplan's "
                               "reference models; define tp_plan(model, sequence_parallel) in its model.py")
    parallelize_module(model, tp_mesh, layout)
    retie(model, ties)
