"""Tensor parallelism (Megatron column/row split) with optional sequence parallelism, as DTensor layouts.

The layout is data: a dict from module path to a torch ParallelStyle, derived from the reference models'
block structure (attention wq/wk/wv column-parallel, wo row-parallel; MLP/SwiGLU w1/w3 column, w2 row;
vocabulary-parallel embedding and output). A user's model.py may define `tp_plan(model, sequence_parallel)`
returning its own dict; the executor then uses that instead.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from autoplan.errors import InvalidPlanError
from autoplan.executor.derived_tp import (block_inputs_to_gather, derived_block_layout, gather_sequence_before,
                                         moe_paths, regroup_fused_qkv, retie, tied_groups)


def block_layout(block: nn.Module, *, sequence_parallel: bool) -> dict:
    """{relative module path: ParallelStyle} for one transformer block of the reference models.

    Attention: q/k/v (MLA: the query and key/value up-projections, by heads) column-parallel, the output
    row-parallel; MLA's down-projections and latent norms stay whole on every tp rank (Megatron-LM's MLA).
    A dense MLP: column then row. A MoE layer is not split by tp ("parallel folding", `moe_layout`)."""
    mla = hasattr(block.attention, "wkv_b")
    columns = [n for n in ("wq", "wq_b", "wkv_b") if hasattr(block.attention, n)] if mla else ["wq", "wk", "wv"]
    out = Shard(1) if sequence_parallel else Replicate()
    layout = {f"attention.{n}": ColwiseParallel() for n in columns}
    layout["attention.wo"] = RowwiseParallel(output_layouts=out)
    moe = hasattr(block.feed_forward, "num_experts")
    if moe:
        layout.update(moe_layout("feed_forward", sequence_parallel=sequence_parallel))
    else:
        ffn_cols = [n for n in ("w1", "w3") if hasattr(block.feed_forward, n)]
        layout.update({f"feed_forward.{n}": ColwiseParallel() for n in ffn_cols})
        layout["feed_forward.w2"] = RowwiseParallel(output_layouts=out)
    if sequence_parallel:  # norms on sequence shards
        layout["attention_norm"] = SequenceParallel()
        layout["ffn_norm"] = SequenceParallel()
    # the attention's and the MLP's input made one replicated DTensor (with SP: the sequence gathered), which the
    # column-parallel Linears share: their input gradients add up as partial sums and are reduced once per module
    # in backward (Megatron's one all-reduce per f/g pair), not once per Linear (q, k and v: three)
    layout["attention"] = PrepareModuleInput(input_layouts=(out, None), desired_input_layouts=(Replicate(), None),
                                             use_local_output=mla)
    if not moe:
        layout["feed_forward"] = PrepareModuleInput(input_layouts=(out,), desired_input_layouts=(Replicate(),))
    return layout


def moe_layout(path: str, *, sequence_parallel: bool) -> dict:
    """{path: style} for the MoE layer at `path` under tp: each tp rank routes its own sequence shard, as if
    the tp ranks were more data-parallel ranks for the experts (Megatron-LM's MoE "parallel folding": experts
    over ep x edp ranks folded from dp x cp x tp; executor.expert_parallel). With SP the shard is already
    there; without, the replicated input is split (its gradient all-gathered in backward) and the output
    all-gathered (its gradient sliced). The layer's own parameters are plain tensors on every rank; their
    gradients are summed over the tp ranks with the data-parallel ones (expert_parallel.average_gradients,
    or FSDP over the folded ranks; at ep=1 too: expert_parallel.folds_experts)."""
    if sequence_parallel:
        return {path: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                         use_local_output=True)}
    return {path: _SequenceShardedModule()}


class _SequenceShardedModule(PrepareModuleInput):
    """Replicated input -> this rank's sequence shard (local); local output -> all-gathered (local)."""

    def __init__(self):
        super().__init__(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True)
        self.output = PrepareModuleOutput(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),),
                                          use_local_output=True)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        super()._apply(module, device_mesh)
        return self.output._apply(module, device_mesh)


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
        layout = model_layout(model, sequence_parallel=sequence_parallel, blocks=lambda block: _foreign_block_layout(
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
    for module in model.modules():
        if isinstance(getattr(module, "shared_key", None), nn.Module):
            module.shared_key.register_forward_hook(_sum_gradient_over(tp_mesh))
    retie(model, ties)


def _foreign_block_layout(block: nn.Module, *, sequence_parallel: bool, tp: int) -> dict:
    """A block of a model autoplan did not write: attention and dense MLPs split as derived from their Linear
    names, a MoE layer run on sequence shards as the reference MoE is (parallel folding)."""
    layout = derived_block_layout(block, sequence_parallel=sequence_parallel, tp=tp)
    for path in moe_paths(block):
        layout.update(moe_layout(path, sequence_parallel=sequence_parallel))
    return layout


def _sum_gradient_over(tp_mesh: DeviceMesh):
    """A forward hook: the output unchanged, its gradient summed over the tp ranks in backward (Megatron's
    copy-to-tensor-parallel-region): for a tensor every rank's heads use, such as MLA's shared RoPE key."""

    def hook(module, args, output):
        whole = DTensor.from_local(output, tp_mesh, [Replicate()], run_check=False)
        return whole.to_local(grad_placements=[Partial()])

    return hook
