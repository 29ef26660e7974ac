"""Memory formulas: model states under ZeRO, activations under TP/SP/CP and recomputation."""

from __future__ import annotations

from autoplan.schema import LayerProfile

# Mixed-precision Adam keeps, per parameter (Rajbhandari et al. 2020, ZeRO, Sec. 3.1):
#   2 bytes fp16/bf16 parameters + 2 bytes fp16/bf16 gradients
#   + K = 12 bytes of optimizer state (fp32 master parameters 4, momentum 4, variance 4).
PARAM_BYTES = 2
GRAD_BYTES = 2
OPTIMIZER_BYTES = 12
# Adam's step reads and writes, per parameter of its shard: fp32 master (4 + 4), momentum (4 + 4),
# variance (4 + 4), reads the bf16 gradient (2) and writes the bf16 parameter (2) = 28 bytes.
ADAM_STEP_BYTES = 28
# ZeRO-1 (executor.zero_one): the updated chunks of tensors smaller than this are all-gathered together, one
# collective per bucket of at most this many elements (and at most the largest tensor's)
ZERO1_GATHER_BUCKET_ELEMENTS = 2**22


def model_state_bytes(*, params: float, zero_stage: int, shard_degree: int) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer states) bytes on one rank for `params` parameters it computes on.

    ZeRO (Rajbhandari et al. 2020, Fig. 1): stage 0 keeps 2Ψ + 2Ψ + 12Ψ; stage 1 (P_os) divides the
    12Ψ by N_d; stage 2 (P_os+g) also the gradients; stage 3 (P_os+g+p) also the parameters.
    `shard_degree` is N_d, the data-parallel ranks the states are sharded over. Ignores padding to
    bucket sizes and the fp32 gradient buffer some frameworks add (Megatron's main_grad).
    """
    n = max(shard_degree, 1)
    param_bytes = PARAM_BYTES * params / (n if zero_stage >= 3 else 1)
    grad_bytes = GRAD_BYTES * params / (n if zero_stage >= 2 else 1)
    optimizer_bytes = OPTIMIZER_BYTES * params / (n if zero_stage >= 1 else 1)
    return param_bytes, grad_bytes, optimizer_bytes


def local_params(*, layer: LayerProfile, tp: int, ep: int, etp: int = 1) -> tuple[float, float]:
    """(dense, expert) parameters of `layer` held by one rank: TP splits the column/row-parallel
    weights (Shoeybi et al. 2019, Sec. 3) and replicates norms and routers; EP splits experts and etp
    each expert's width (every routed-expert weight has the width as one dim). A MoE layer's router and
    shared experts stay whole under tp (each tp rank routes its own tokens: parallel folding)."""
    dense = layer.params - layer.expert_params
    if layer.kind == "moe":
        return dense, layer.expert_params / (ep * etp)
    return dense - layer.tp_sharded_params * (1 - 1 / tp), layer.expert_params / (ep * etp)


def layer_activation_bytes(*, layer: LayerProfile, tp: int, sequence_parallel: bool, cp: int,
                           recompute: str, micro_batch_size: int, block_first: bool) -> float:
    """Bytes a rank keeps for backward for one micro-batch through `layer`.

    Generalises Korthikanti et al. 2022 (Sec. 4) from their GPT layer to any traced layer:
    the traced bytes split into a part TP shards (between column- and row-parallel GEMMs: 24sbh +
    5as²b in their GPT layer) and a replicated part (norms, their outputs, dropout masks: 10sbh).
      none:      replicated/(tp if SP else 1) + sharded/tp        (their eq. 2: sbh(10 + 24/t + 5as/ht);
                                                                  with SP, eq. 4: sbh(34/t + 5as/ht))
      selective: the same without the seq x seq attention scores (their Sec. 4.3: 34sbh/t with SP)
      full:      only the input of each transformer block (2sbh, /t with SP; Sec. 4.1)
    Context parallelism splits every activation by the sequence: /cp. Layers outside transformer
    blocks (embedding, final norm, head) are not recomputed.
    """
    per_sequence: float
    if recompute == "full" and layer.block is not None:
        per_sequence = layer.output_bytes if block_first else 0.0
        per_sequence /= tp if sequence_parallel else 1
    else:
        sharded = layer.activation_tp_sharded_bytes
        if recompute == "selective" and layer.block is not None:
            sharded -= layer.attention_score_bytes
        replicated = layer.activation_bytes - layer.activation_tp_sharded_bytes
        per_sequence = replicated / (tp if sequence_parallel else 1) + sharded / tp
    return per_sequence * micro_batch_size / cp
