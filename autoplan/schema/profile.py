"""What: the model as the cost model sees it (ModelProfile), its layers (LayerProfile) and their GEMMs
(GemmShape), costs per sequence."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from autoplan.schema.base import _FINITE, SCHEMA_VERSION, _Noun

LayerKind = Literal["embedding", "attention", "mlp", "moe", "norm", "head", "other"]
TpSplit = Literal["n", "k", "none"]


class GemmShape(_Noun):
    """One matrix multiply of a layer's forward pass: (m x k) @ (k x n), `count` times."""

    model_config = _FINITE

    m_per_sequence: float = Field(description="Rows per sequence of micro-batch (tokens; tokens*top_k/experts for experts).")
    n: int = Field(description="Output features.")
    k: int = Field(description="Reduction dimension (input features).")
    count: int = Field(1, description="How many identical GEMMs of this shape the layer runs per forward.")
    tp_split: TpSplit = Field("none", description="Which dim tensor parallelism shards: n (column-parallel), k (row-parallel), none.")


class LayerProfile(_Noun):
    """Cost of one layer for ONE sequence (micro-batch 1) at the profile's seq_len, traced on meta."""

    model_config = _FINITE

    name: str = Field(description="Module path, e.g. 'layers.3.attention'.")
    kind: LayerKind = Field(description="embedding, attention, mlp, moe, norm, head or other.")
    block: int | None = Field(None, description="Index of the transformer block this layer belongs to; None outside blocks.")
    fwd_flops: float = Field(description="Forward FLOPs per sequence (torch.utils.flop_counter).")
    bwd_flops: float = Field(description="Backward FLOPs per sequence (torch.utils.flop_counter).")
    attention_core_fwd_flops: float = Field(0.0, description="Part of fwd_flops inside attention's softmax(QK^T)V core.")
    params: int = Field(description="Parameters owned by this layer.")
    tp_sharded_params: int = Field(0, description="Parameters that tensor parallelism splits (the rest are replicated).")
    frozen_params: int = Field(0, description="Part of params that does not train (requires_grad=False: a frozen base "
                                              "under LoRA, --trainable): no gradient, optimizer state or data-parallel "
                                              "gradient traffic.")
    expert_params: int = Field(0, description="Parameters of routed experts (split by expert parallelism).")
    tied_params: int = Field(0, description="Parameters this layer uses that an earlier layer holds and counts (a tied "
                                            "weight, e.g. the output head's table shared with the embedding); not in "
                                            "params. A pipeline stage without that earlier layer holds its own copy.")
    activation_bytes: int = Field(description="Bytes autograd saves for backward per sequence (measured, deduplicated by storage).")
    activation_tp_sharded_bytes: int = Field(0, description="Part of activation_bytes between a column- and a row-parallel GEMM (split by tp without SP).")
    attention_kv_bytes: int | None = Field(None, ge=0, description="Bytes of the keys and values a fused attention kernel "
                                                                   "reads per sequence, as the model passes them (a GQA "
                                                                   "model that repeats its heads first passes them "
                                                                   "repeated); None (older profiles): not traced.")
    attention_score_bytes: int = Field(0, description="Part of activation_bytes shaped [.., seq, seq] (what flash attention and selective recompute drop).")
    activation_column_input_bytes: int = Field(0, description="Part of activation_bytes saved as the input of a column-parallel "
                                                              "GEMM (replicated over tp; all-gathered, whole, under DTensor sequence parallelism).")
    selective_bytes: int = Field(0, description="Bytes per sequence that the executor's selective recompute keeps: the output of "
                                                "every forward op except those square in their last two dims.")
    selective_tp_sharded_bytes: int = Field(0, description="Part of selective_bytes between a column- and a row-parallel GEMM.")
    forward_peak_bytes: int = Field(0, description="Most bytes forward through the layer holds at once beyond what it leaves "
                                                   "saved, per sequence (its temporaries).")
    backward_peak_bytes: int = Field(0, description="Most bytes backward through the layer holds at once beyond the activations "
                                                    "saved when it starts: activation gradients and temporaries (less saved ones "
                                                    "already freed), per sequence, gradient accumulation's steady state; the part "
                                                    "that grows with the batch (the rest: backward_peak_weight_bytes).")
    backward_peak_weight_bytes: int = Field(0, description="Part of the backward temporaries that does not grow with the "
                                                           "batch (weight-gradient temporaries), per layer, not per sequence.")
    output_bytes: int = Field(description="Bytes of the layer's output per sequence (what crosses the layer boundary).")
    memory_bound_bytes: float = Field(0.0, description="Bytes read+written by non-GEMM ops in forward per sequence (costed at HBM bandwidth).")
    memory_bound_tp_sharded_bytes: float | None = Field(None, ge=0, description="The part of memory_bound_bytes on tensors "
                                                                             "tp splits without SP (between a column- and "
                                                                             "a row-parallel GEMM); None (older profiles): "
                                                                             "the activations' sharded share.")
    streaming_bytes: float = Field(0.0, ge=0, description="The part of memory_bound_bytes moved by streaming ops (copies, "
                                                         "indexing, add/mul: costmodel.compute.STREAMING_OPS), priced at "
                                                         "Cluster.streaming_efficiency.")
    memory_bound_bwd_bytes: float | None = Field(None, ge=0, description="Bytes read+written by non-GEMM ops in backward per "
                                                                     "sequence (the part growing with the batch); None "
                                                                     "(older profiles): twice memory_bound_bytes.")
    memory_bound_bwd_tp_sharded_bytes: float | None = Field(None, ge=0, description="The part of memory_bound_bwd_bytes on "
                                                                                "gradients tp splits without SP.")
    streaming_bwd_bytes: float | None = Field(None, ge=0, description="The part of memory_bound_bwd_bytes moved by "
                                                                      "streaming ops.")
    gemms: list[GemmShape] = Field(default_factory=list, description="The forward GEMMs (attention core excluded).")
    tp_collectives: int = Field(0, description="Collectives of the [b, s, h] activation per forward under tensor parallelism "
                                               "(one per row-parallel GEMM; one for embedding, head and MoE dispatch).")
    num_heads: int = Field(0, description="Query heads (attention layers).")
    num_kv_heads: int = Field(0, description="Key/value heads (attention layers).")
    num_experts: int = Field(0, description="Routed experts (moe layers).")
    top_k: int = Field(0, description="Experts per token (moe layers).")


class ModelProfile(_Noun):
    """The model as the cost model sees it: an ordered list of layers, costs per sequence."""

    model_config = _FINITE

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    name: str = Field(description="Built-in name or model.py path the profile was made from.")
    seq_len: int = Field(description="Tokens per sequence the costs were traced at.")
    dtype: str = Field("bfloat16", description="Activation/parameter dtype of the trace.")
    dtype_bytes: int = Field(2, description="Bytes per element of dtype.")
    hidden: int = Field(description="Model width h.")
    vocab_size: int = Field(0, description="Vocabulary size (0 if the model has no embedding).")
    num_blocks: int = Field(description="Transformer blocks (the units a pipeline splits).")
    num_heads: int = Field(0, description="Attention query heads.")
    num_kv_heads: int = Field(0, description="Attention key/value heads.")
    num_experts: int = Field(0, description="Routed experts per MoE layer (0: dense model).")
    top_k: int = Field(0, description="Experts per token.")
    routing_imbalance: float = Field(1.1, ge=1.0, le=1024.0, description="Tokens the busiest expert-parallel rank "
                                     "receives over the mean (1.0: perfectly balanced routing). Default 1.1: Switch "
                                     "Transformer trains at capacity factor 1.0-1.25 with few tokens dropped (Fedus "
                                     "et al. 2022, Table 1); set it from a measured router.")
    routing_groups: int = Field(1, ge=1, le=65536, description="Groups the routed experts form for group-limited "
                                "routing (DeepSeek-V3's n_group: 8); 1: no groups.")
    routing_group_top_k: int = Field(0, ge=0, le=65536, description="Groups a token's experts may come from (DeepSeek-V3's "
                                     "topk_group: 4, which with one group per node limits a token to 4 nodes); 0: any.")
    attention: Literal["flash", "eager"] = Field("flash", description="How attention was traced: flash (no seq x seq saved) or eager.")
    layers: list[LayerProfile] = Field(description="Layers in forward order.")
    notes: list[str] = Field(default_factory=list, description="What the profiler could not recognize in the model, "
                                                               "one line each (numbers that rest on a guess).")

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def fwd_flops_per_sequence(self) -> float:
        return sum(layer.fwd_flops for layer in self.layers)

    @property
    def train_flops_per_sequence(self) -> float:
        """Model FLOPs of one training step per sequence (forward + backward, no recompute)."""
        return sum(layer.fwd_flops + layer.bwd_flops for layer in self.layers)

    @property
    def expert_ffn_hidden(self) -> int:
        """A routed expert's width F (what expert tensor parallelism splits): the output features of the
        experts' up-projections (GEMMs recorded a multiple of num_experts times, reducing over hidden); 0
        when the profile has none."""
        return next((g.n for layer in self.layers if layer.kind == "moe" for g in layer.gemms
                     if self.num_experts and g.count % self.num_experts == 0 and g.count >= self.num_experts
                     and g.k == self.hidden), 0)
