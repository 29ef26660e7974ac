"""One layer's memory for one micro-batch on one rank as autoplan's executor runs it: what it keeps for
backward (`executor_activation_bytes`, point 2 of costmodel.rank_memory's docstring), the temporaries of its
forward and backward, and how a block's layers compose into the moment of a backward that holds the most
(`backward_excess`, `backward_steps`, `forward_excess`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autoplan.schema import LayerProfile

# Under expert tensor parallelism a MoE layer's backward holds h-wide gradients of etp x its [T·k, h] rows
# where the single process held one: of the experts' partial output, of their rows, the index backward's zeros
# and of the rows before the gather: 4 (mixtral-8x7b, 2 blocks, full recompute, ep 1-8 x etp 2-4: the dry
# run's temporaries within 10% with 4 where none had been -26%); they do not overlap the stacked weights'
# gradient temporaries (max of the two).
ETP_GRADIENT_COPIES = 4


@dataclass(frozen=True)
class LayerMemory:
    """One layer for one micro-batch on one rank, in bytes."""

    kept: float             # kept from forward to backward under the rank's recompute mode
    kept_none: float        # kept without recompute (what a recomputed block rebuilds in backward)
    forward_excess: float   # temporaries of its forward beyond what it keeps
    backward_excess: float  # temporaries of its backward beyond what it kept (steady state)
    output_kept: float      # the head's logits, held by the training loop / schedule until backward
    loss_kept: float = 0.0  # part of `kept` only the loss needs (the head's fp32 log-probabilities)
    weight_grad_inputs: float = 0.0  # gradients of the outputs whose weight gradients zero-bubble defers
    largest_tensor_params: float = 0.0  # its largest parameter tensor on this rank


def executor_activation_bytes(*, layer: LayerProfile, tp: int, sequence_parallel: bool, cp: int,
                              micro_batch_size: int, recompute: str, block_first: bool,
                              recomputed_gemms: Sequence[tuple] = (), dtype_bytes: int = 2) -> float:
    """Bytes the executor keeps for backward for one micro-batch through `layer` (its kernels; see the
    module docstring, point 2). Korthikanti et al. 2022's accounting is costmodel.memory.layer_activation_bytes;
    this differs where the executor does: sequence parallelism keeps the gathered column-parallel inputs
    (activation_column_input_bytes) whole, the head is not split by tp, selective recompute keeps
    selective_bytes (when the profile has them), full recompute the block's input."""
    scale = micro_batch_size / cp
    if layer.kind == "head":
        return layer.activation_bytes * scale
    if recompute == "full" and layer.block is not None:
        return (layer.output_bytes / (tp if sequence_parallel else 1) if block_first else 0.0) * scale
    if recompute == "selective" and layer.block is not None and layer.selective_bytes:
        # autoplan.selective keeps the GEMMs' and reductions' outputs (under tp a row-parallel GEMM's reduced
        # output, not its partial sum); SP's all-gathers run again in backward; the checkpoint keeps the
        # block's input
        total, sharded, gathered = layer.selective_bytes, layer.selective_tp_sharded_bytes, 0.0
        for g, n in recomputed_gemms:  # a policy that reruns some GEMMs (Stack.selective_recompute) keeps less
            out = n * g.m_per_sequence * g.n * dtype_bytes
            total -= out
            sharded -= out if g.tp_split == "n" else 0.0
        if block_first:
            total += layer.output_bytes
    else:
        total, sharded = layer.activation_bytes, layer.activation_tp_sharded_bytes
        gathered = layer.activation_column_input_bytes if sequence_parallel else 0.0
        if recompute == "selective" and layer.block is not None:
            sharded -= layer.attention_score_bytes
            total -= layer.attention_score_bytes
        if sequence_parallel:  # the gathered copy replaces the sequence shard the column GEMM would save
            total -= layer.activation_column_input_bytes
    if layer.kind == "moe":  # each tp rank routes its own sequence shard (parallel folding), with SP or without
        return total / tp * scale
    replicated = total - sharded
    return (replicated / (tp if sequence_parallel else 1) + sharded / tp + gathered) * scale


def _split(layer: LayerProfile, *, tp: int, sequence_parallel: bool) -> float:
    """How much tp (and SP) shrink this layer's activations: none-mode bytes under tp / bytes per sequence."""
    if layer.kind == "head" or not layer.activation_bytes or tp == 1:
        return 1.0
    none = executor_activation_bytes(layer=layer, tp=tp, sequence_parallel=sequence_parallel, cp=1,
                                     micro_batch_size=1, recompute="none", block_first=False)
    return none / layer.activation_bytes


def layer_memory(*, layer: LayerProfile, tp: int, sequence_parallel: bool, cp: int, micro_batch_size: int,
                 recompute: str, block_first: bool, ep: int = 1, dtype_bytes: int = 2,
                 vocab_parallel_loss: bool = False, recomputed_gemms: Sequence[tuple] = (), etp: int = 1) -> LayerMemory:
    """Memory of `layer` per micro-batch on one rank. Temporaries that grow with the batch scale as the
    layer's activations do; weight-gradient temporaries as its weights (1/tp, experts 1/(ep·etp); a vocabulary-
    parallel embedding's gradient comes back whole). vocab_parallel_loss: the stack computes the loss on the
    vocabulary-parallel logits (Stack.vocab_parallel_loss: torch's loss_parallel, Megatron-LM), so the
    head's logits, their fp32 copies and their temporaries are 1/tp on each rank; autoplan's executor
    gathers them."""
    common = dict(layer=layer, tp=tp, sequence_parallel=sequence_parallel, cp=cp, micro_batch_size=micro_batch_size,
                  block_first=block_first)
    scale = _split(layer, tp=tp, sequence_parallel=sequence_parallel) * micro_batch_size / cp
    weights = 1.0 if layer.kind == "embedding" else 1 / (ep * etp) if layer.kind == "moe" else 1 / tp
    weight_temporaries = layer.backward_peak_weight_bytes * weights
    if layer.kind == "embedding":  # the whole-table gradient comes once, in the parameters' dtype (the traced
        # decomposition accumulates in fp32: twice that, which the dry run of deepseek-v3's first stage did not hold)
        weight_temporaries = min(weight_temporaries, layer.params * dtype_bytes)
    kept = executor_activation_bytes(recompute=recompute, recomputed_gemms=recomputed_gemms, dtype_bytes=dtype_bytes,
                                     **common)
    kept_none = executor_activation_bytes(recompute="none", **common)
    logits_split = tp if layer.kind == "head" and vocab_parallel_loss else 1
    if logits_split > 1:  # the head's input stays whole (or the SP shard gathered), the rest is logits
        kept = (layer.activation_column_input_bytes + (layer.activation_bytes - layer.activation_column_input_bytes)
                / logits_split) * micro_batch_size / cp
        kept_none = kept
        scale /= logits_split
    rows = layer.output_bytes * layer.top_k * micro_batch_size / cp / tp  # the rank's routed rows [T·k, h]
    if layer.kind == "moe" and ep * etp > 1:  # the exchanged rows (dispatched over ep, then gathered over etp:
        # etp x [T·k, h]) stay for backward (and a recomputed forward rebuilds them); selective recompute reruns
        # the exchange (qwen3-30b-a3b, ep 8: the dry run kept 6 GiB less); mixtral-8x7b, 2 blocks, dp 8 with
        # ep 2 etp 2 and ep 1 etp 4: the dry run kept 1 + 2·(etp - 1) x [T·k, h] per layer over ep alone
        dispatched = etp * rows
        kept, kept_none = kept + (dispatched if recompute == "none" else 0.0), kept_none + dispatched
    if layer.kind == "moe" and etp > 1:  # expert tensor parallelism runs the experts on etp x the rows: their
        # h-wide tensors grow by etp (the gathered rows the GEMMs keep without recompute, w2's partial output
        # selective recompute keeps instead), the F-wide ones do not (etp x the rows, 1/etp of the width)
        gathered = (etp - 1) * rows
        kept, kept_none = kept + (gathered if recompute != "full" else 0.0), kept_none + gathered
    head = layer.kind == "head"
    etp_gradients = ETP_GRADIENT_COPIES * (etp - 1) * rows if layer.kind == "moe" else 0.0
    return LayerMemory(
        kept=kept, kept_none=kept_none,
        forward_excess=layer.forward_peak_bytes * scale,
        backward_excess=layer.backward_peak_bytes * scale + max(weight_temporaries, etp_gradients),
        output_kept=layer.output_bytes * micro_batch_size / cp / logits_split if head else 0.0,
        loss_kept=((layer.activation_bytes - layer.activation_column_input_bytes) * micro_batch_size / cp / logits_split
                   if head else 0.0),
        weight_grad_inputs=_weight_gradient_inputs(layer, tp=tp, sequence_parallel=sequence_parallel,
                                                   dtype_bytes=dtype_bytes) * micro_batch_size / cp,
        largest_tensor_params=_largest_tensor(layer, tp=tp, ep=ep * etp))


def _weight_gradient_inputs(layer: LayerProfile, *, tp: int, sequence_parallel: bool, dtype_bytes: int) -> float:
    """Bytes per sequence of the gradients of the layer's weight-GEMM outputs (what a weight-gradient step
    needs besides the saved inputs), plus that of its norm's output: each GEMM's m x n, split by tp when
    column-parallel (and, with SP, when row-parallel: its output is reduce-scattered)."""
    total = 0.0
    for g in layer.gemms:
        split = tp if g.tp_split == "n" or (g.tp_split == "k" and sequence_parallel) else 1
        total += g.count * g.m_per_sequence * g.n * dtype_bytes / split
    if layer.block is not None or layer.kind == "norm":
        total += layer.output_bytes / (tp if sequence_parallel else 1)
    return total


def _largest_tensor(layer: LayerProfile, *, tp: int, ep: int) -> float:
    """Parameters of the layer's largest tensor on one rank: the embedding table or output weight (split by
    tp), a GEMM weight n x k (split when tensor-parallel), a stacked expert weight (a third of the experts'
    parameters, split by ep, or by ep·etp under expert tensor parallelism)."""
    if layer.kind in ("embedding", "head"):
        return layer.params / tp
    largest = max((g.n * g.k / (tp if g.tp_split != "none" else 1) for g in layer.gemms if layer.kind != "moe"),
                  default=0.0)
    return max(largest, layer.expert_params / 3 / ep)


def backward_excess(steps: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(temporaries, kept activations already freed) at the moment of one micro-batch's backward that holds
    the most: `steps` are (kept, temporaries) of each backward step in order; a step's temporaries come on
    top of what the steps before it have freed, so the moment is argmax_i (temporaries_i - sum_{j<i} kept_j)."""
    freed, most = 0.0, (0.0, 0.0)
    for kept, temporaries in steps:
        if temporaries - freed > most[0] - most[1]:
            most = (temporaries, freed)
        freed += kept
    return most


def backward_steps(layers: Sequence[LayerMemory], recompute: str) -> list[tuple[float, float]]:
    """(kept, temporaries) of the backward steps through one block's layers (forward order given); under
    recompute the block first rebuilds the activations it did not keep (full: all; selective: all but the
    GEMMs' outputs it kept), which then count among the temporaries."""
    if recompute not in ("full", "selective"):
        return [(m.kept, m.backward_excess) for m in reversed(layers)]
    kept = sum(m.kept for m in layers)
    rebuilt = sum(m.kept_none for m in layers) - (kept if recompute == "selective" else 0.0)
    temporaries, freed = backward_excess([(m.kept_none, m.backward_excess) for m in reversed(layers)])
    return [(kept, max(rebuilt, 0.0) + temporaries - freed)]


def forward_excess(layers: Sequence[LayerMemory]) -> float:
    """Most bytes above the kept activations during one micro-batch's forward (forward order given):
    a layer's temporaries while the layers after it have kept nothing yet."""
    after, most = 0.0, 0.0
    for m in reversed(layers):
        most = max(most, m.forward_excess - after)
        after += m.kept
    return most
