"""Tensor-parallel layouts derived from a block's own module names, for models autoplan did not write
(transformers' Llama, Qwen, Mistral, Mixtral-style attention, GPT-2), in the embed -> layers -> norm ->
output layout (autoplan.models.hf).

Megatron's split (Shoeybi et al. 2019, Sec. 3) by the common vocabularies of Linear names:
| column-parallel (output split)                   | row-parallel (input split)         |
|--------------------------------------------------|------------------------------------|
| q_proj k_proj v_proj, query key value, wq wk wv  | o_proj, out_proj, wo, dense        |
| gate_proj up_proj, w1 w3, fc1, c_fc, fc_in       | down_proj, w2, fc2, c_proj, fc_out |
| c_attn (GPT-2's fused q|k|v, rows regrouped)     |                                    |
A fused q|k|v weight is regrouped so that each rank's contiguous shard holds its own heads' q, k and v
(and the attention's `split_size` becomes h/tp): the same function, split by heads. A Linear with another
name, or a fused qkv of another kind, is refused in one line asking for a tp_plan. A MoE layer (the module
holding transformers' stacked experts, with its router and shared experts) is not split: it is left to
the caller, which runs it as the reference MoE under tp (tensor_parallel.moe_layout, parallel folding).

With sequence parallelism the norms run on sequence shards (SequenceParallel), each attention and MLP
gathers its input's sequence first (an autograd-aware all-gather, whose backward is a reduce-scatter:
what PrepareModuleInput does, found here whether the block passes the input by position or as
`hidden_states=`), and the row-parallel outputs are reduce-scattered back to sequence shards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from autoplan.errors import InvalidPlanError
from autoplan.models.hf_experts import is_stacked_experts

COLUMN = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "wq", "wk", "wv", "gate_proj", "up_proj", "w1",
          "w3", "fc1", "c_fc", "fc_in"}
ROW = {"o_proj", "out_proj", "wo", "dense", "down_proj", "w2", "fc2", "c_proj", "fc_out"}
FUSED_QKV = {"c_attn"}
ASK = "define tp_plan(model, sequence_parallel) in a model.py that builds it"


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def derived_block_layout(block: nn.Module, *, sequence_parallel: bool, tp: int) -> dict:
    """{relative path: ParallelStyle} for one block, from its Linear names (module docstring)."""
    out = Shard(1) if sequence_parallel else Replicate()
    layout = {}
    moe = moe_paths(block)
    for path, module in block.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if any(path == p or path.startswith(p + ".") for p in moe):
            continue
        if isinstance(module, nn.Linear):
            if leaf in COLUMN or leaf in FUSED_QKV:
                layout[path] = ColwiseParallel()
            elif leaf in ROW:
                layout[path] = RowwiseParallel(output_layouts=out)
            else:
                raise InvalidPlanError(f"tp={tp}: cannot tell how to split {type(block).__name__}.{path} (a Linear "
                                       f"named {leaf!r}, not one of the known q/k/v/o, gate/up/down, c_attn/c_fc/"
                                       f"c_proj names); {ASK}")
        elif sequence_parallel and _is_norm(module) and any(True for _ in module.parameters(recurse=False)):
            layout[path] = SequenceParallel()
    return layout


def moe_paths(block: nn.Module) -> list[str]:
    """Paths of the block's MoE layers: the modules whose children include transformers' stacked experts."""
    return [path for path, module in block.named_modules() if any(is_stacked_experts(c) for c in module.children())]


def regroup_fused_qkv(block: nn.Module, tp: int) -> None:
    """Reorder each fused q|k|v Linear's output rows [q | k | v] into [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] so
    the tp shards are whole heads of each, and set the attention's split_size to h/tp (in place, before
    the weights are distributed)."""
    for path, module in block.named_modules():
        if path.rsplit(".", 1)[-1] not in FUSED_QKV or not isinstance(module, nn.Linear):
            continue
        attention = block.get_submodule(path.rpartition(".")[0]) if "." in path else block
        hidden = module.out_features // 3
        heads = getattr(attention, "num_heads", 0)
        if getattr(attention, "split_size", None) != hidden or module.out_features != 3 * hidden or heads % tp:
            raise InvalidPlanError(f"tp={tp}: {type(block).__name__}.{path} fuses q, k and v in a way autoplan cannot "
                                   f"split by heads; {ASK}")
        rows = torch.arange(3 * hidden).view(3, tp, hidden // tp).transpose(0, 1).reshape(-1)
        with torch.no_grad():
            if not module.weight.is_meta:
                module.weight.copy_(module.weight[rows])
                if module.bias is not None:
                    module.bias.copy_(module.bias[rows])
        attention.split_size = hidden // tp


def gather_sequence_before(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """With sequence parallelism: all-gather the sequence of the module's input (first tensor argument or
    `hidden_states=`) before it runs; autograd's backward reduce-scatters."""

    def gather(t: torch.Tensor) -> torch.Tensor:  # a norm's output is a DTensor, a residual sum a local shard
        sharded = t if isinstance(t, DTensor) else DTensor.from_local(t, tp_mesh, [Shard(1)], run_check=False)
        return sharded.redistribute(tp_mesh, [Replicate()]).to_local()

    def hook(mod, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (gather(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": gather(kwargs["hidden_states"])}
        return None

    module.register_forward_pre_hook(hook, with_kwargs=True)


def block_inputs_to_gather(block: nn.Module) -> list[nn.Module]:
    """The block's children that hold column-parallel GEMMs (attention, MLP): they gather the sequence. A MoE
    layer does not: under tp it routes its own sequence shard."""
    return [child for child in block.children()
            if any(isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in COLUMN | FUSED_QKV
                   for name, m in child.named_modules())
            and not any(is_stacked_experts(m) for m in child.modules())]


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Module paths of the parameters several modules share (a tied embedding and head), in groups."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return [names for names in owners.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Point every name of each group at the first one's parameter again (parallelize_module gives each
    module its own new parameter)."""
    for names in groups:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, first)
