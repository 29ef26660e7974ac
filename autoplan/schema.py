"""The shared nouns: what (ModelProfile), where (Cluster), how (Plan), and the answer (Estimate).

Every noun is a pydantic model with `extra="forbid"` and a description on each field, serialisable to
JSON with a schema version, so a plan found on a laptop is a file that a 1,000-GPU job loads.
Units are in the names (`_bytes`, `_s`, `_flops`, `_per_s`); everything is SI inside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from autoplan.errors import InvalidInputError, InvalidPlanError
from autoplan.safe_io import parse_json, read_text, write_text

SCHEMA_VERSION = 1
MAX_GPUS = 2**20          # bounds that keep every enumeration fast; far above any job run today
MAX_GLOBAL_BATCH = 2**30
PRESETS_DIR = Path(__file__).parent / "profiler" / "presets"

LayerKind = Literal["embedding", "attention", "mlp", "moe", "norm", "head", "other"]
Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"]
Recompute = Literal["none", "selective", "full"]
Offload = Literal["none", "optimizer", "params"]
TpSplit = Literal["n", "k", "none"]


class _Noun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # values: change with model_copy(update=...)

    @field_validator("schema_version", check_fields=False)
    @classmethod
    def _this_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema_version {value}: this autoplan reads version {SCHEMA_VERSION}")
        return value

    @classmethod
    def load(cls, path: str | Path):
        """Read a JSON file of this noun; a missing or malformed file raises InvalidInputError."""
        text = read_text(path, f"{cls.__name__} file")
        parse_json(text, str(path))  # one-line errors for bad JSON, NaN/Infinity, deep nesting
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise InvalidInputError(f"{path}: {one_line(err)}") from None

    def save(self, path: str | Path, *, force: bool = True) -> None:
        """Write as JSON, atomically and never through a link (safe_io.write_text); an existing file is
        replaced only with `force` (the CLI passes its --force)."""
        write_text(path, self.model_dump_json(indent=2) + "\n", force=force)


_FINITE = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inputs: no NaN or Infinity


def one_line(err: ValidationError) -> str:
    """The first problem pydantic found, as one line a user can read ('tp: tp=3 does not divide ...')."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", str(err)).removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


# ----------------------------------------------------------------------------------------- what
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


# ----------------------------------------------------------------------------------------- where
class Link(_Noun):
    """A point-to-point link class: achievable per-GPU bandwidth (bus bandwidth) and latency."""

    model_config = _FINITE

    bandwidth_bytes_per_s: float = Field(gt=0, description="Achievable unidirectional bandwidth per GPU (NCCL bus bandwidth).")
    latency_s: float = Field(ge=0, description="Per-message latency (alpha of the alpha-beta model).")


class EfficiencyPoint(_Noun):
    model_config = _FINITE
    flops: float = Field(gt=0, description="FLOPs of one GEMM.")
    efficiency: float = Field(gt=0, le=1, description="Achieved fraction of peak for a GEMM of that size.")


class Cluster(_Noun):
    """Where a model trains: the GPUs, their memory, and the links between them."""

    model_config = _FINITE

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    name: str = Field(description="Preset name or a label for a measured cluster.")
    gpu: str = Field(description="GPU model.")
    num_gpus: int = Field(1, ge=1, le=MAX_GPUS, description="GPUs in the job.")
    gpus_per_node: int = Field(ge=1, description="GPUs sharing the fast intra-node links.")
    peak_flops_per_s: float = Field(gt=0, description="Peak dense bf16 FLOP/s of one GPU.")
    memory_bytes: int = Field(gt=0, description="HBM per GPU.")
    memory_bandwidth_bytes_per_s: float = Field(gt=0, description="HBM bandwidth per GPU.")
    memory_reserve_bytes: int = Field(ge=0, description="Per-GPU memory not available to tensors: CUDA context, allocator fragmentation, NCCL buffers. "
                                                       "A plan fits when its peak tensor memory plus this reserve is within memory_bytes "
                                                       "(the estimate, the dry run and `search --verify` all use it; docs/dryrun.md).")
    intra_node: Link = Field(description="Links inside a node (NVLink/NVSwitch).")
    inter_node: Link = Field(description="Links between nodes (InfiniBand, per GPU).")
    gemm_efficiency: list[EfficiencyPoint] = Field(min_length=1, description="Achieved fraction of peak against GEMM size; interpolated in log FLOPs.")
    attention_efficiency: float = Field(gt=0, le=1, description="Achieved fraction of peak in the attention core (flash attention fwd+bwd).")
    memory_bound_efficiency: float = Field(gt=0, le=1, description="Achieved fraction of HBM bandwidth in elementwise/normalisation kernels.")
    streaming_efficiency: float | None = Field(None, gt=0, le=1, description="Achieved fraction of memory bandwidth in "
                                                                          "memory-bound ops that copy, index or do one "
                                                                          "add/mul per element (costmodel.compute."
                                                                          "STREAMING_OPS); measured by `autoplan profile` "
                                                                          "(an add). None: memory_bound_efficiency.")
    optimizer_efficiency: float | None = Field(None, gt=0, le=8, description="Bandwidth the optimizer step reaches, as a "
                                                                         "fraction of memory_bandwidth_bytes_per_s for the stack's "
                                                                         "optimizer_step_bytes per parameter; measured by `autoplan "
                                                                         "profile` on the executor's AdamW (above 1 where a CPU's "
                                                                         "cache holds a chunk between its passes). None: "
                                                                         "memory_bound_efficiency.")
    sustained_clock_fraction: float = Field(1.0, gt=0, le=1, description="Tensor-core throughput a training step sustains, as a fraction of "
                                                                         "what the isolated-kernel measurements behind gemm_efficiency and "
                                                                         "attention_efficiency reached (clocks under the power limit with every "
                                                                         "SM and HBM busy for hours, not seconds). Scales GEMM and attention "
                                                                         "time, not memory-bound time.")
    overlap_slowdown: float = Field(0.0, ge=0, le=1, description="Fraction of an overlapped collective's duration that "
                                                                "still lands on the step: the compute beside it slows (NCCL "
                                                                "kernels take SMs and HBM bandwidth) and prefetching does not "
                                                                "hide every gather; 0 is perfect overlap, 1 none.")
    fp8_gemm_speedup: float = Field(1.0, ge=1, le=4, description="Speed of a float8 GEMM relative to a bf16 GEMM of the same shape "
                                                                "(1 where the GPU has no float8 tensor cores).")
    layer_overhead_fwd_s: float = Field(0.0, ge=0, description="Fixed seconds per layer and micro-batch in forward beyond its kernels' work (framework dispatch, kernel launches); fitted by `autoplan profile` from measured layer times, 0 in the presets.")
    layer_overhead_bwd_s: float = Field(0.0, ge=0, description="The same in backward.")
    host_block_s: dict[str, float] = Field(default_factory=dict, description="Seconds the host takes to issue one transformer block's forward and backward, per recompute mode (none, selective, full), measured by `autoplan profile MODEL` on a GPU (profiler.host); a block then costs max(device time, host time) per micro-batch. Empty: the host never limits (CPUs, where dispatch is part of the measured layer times).")
    overheads: dict[str, float] = Field(default_factory=dict, description="Seconds per call of the fixed costs of costmodel.overhead.FEATURES (loop, DTensor dispatch, FSDP units, DDP sync, pipeline micro-batches), fitted by `autoplan calibrate` from measured runs; empty in the presets.")
    host_memory_bytes: int = Field(0, ge=0, description="CPU (host) memory per node, all sockets; 0: unknown, and no plan "
                                                      "that offloads to the host is considered.")
    host_memory_reserve_bytes: int = Field(0, ge=0, description="Host memory per node not available to offloaded states: "
                                                              "the OS, the data loader, CUDA's pinned staging buffers.")
    host_memory_bandwidth_bytes_per_s: float = Field(0.0, ge=0, description="CPU memory bandwidth per node, all sockets "
                                                                          "(what an optimizer step on the CPU is bound by).")
    host_link: Link | None = Field(None, description="Link between host memory and one GPU (PCIe, NVLink-C2C): achievable "
                                                     "bandwidth per direction per GPU and latency; None: unknown.")
    cpu_optimizer_efficiency: float = Field(0.5, gt=0, le=1, description="Fraction of host memory bandwidth an Adam step "
                                                                        "on the CPU reaches (the step's GPUs share the node's "
                                                                        "bandwidth).")
    sources: dict[str, str] = Field(default_factory=dict, description="Where each number comes from.")
    measurements: dict | None = Field(None, description="Raw measurements a profile run fitted the numbers from.")

    @field_validator("overheads")
    @classmethod
    def _overheads_finite(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: s for name, s in value.items() if not (math.isfinite(s) and s >= 0)}
        if bad:
            name, seconds = next(iter(bad.items()))
            raise ValueError(f"overhead {name} = {seconds} s: must be a finite number of seconds >= 0")
        return value

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.num_gpus / self.gpus_per_node)

    @property
    def host_memory_per_gpu_bytes(self) -> int:
        """Host memory one GPU's process may fill with offloaded states: the node's, less its reserve, shared by
        the job's GPUs on the node (all of it for a job of one GPU)."""
        sharing = min(self.gpus_per_node, self.num_gpus)
        return max(self.host_memory_bytes - self.host_memory_reserve_bytes, 0) // sharing

    @property
    def can_offload(self) -> bool:
        return self.host_memory_bytes > 0 and self.host_link is not None and self.host_memory_bandwidth_bytes_per_s > 0

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))

    @classmethod
    def preset(cls, name: str, gpus: int | None = None) -> Cluster:
        """A built-in cluster (dgx-a100-80gb, dgx-h100, dgx-h200) sized to `gpus` GPUs."""
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise InvalidInputError(f"unknown cluster preset {name!r}; presets: {', '.join(cls.presets())}")
        cluster = cls.load(path)
        return cluster.with_gpus(gpus) if gpus is not None else cluster

    @classmethod
    def resolve(cls, name_or_path: str, gpus: int | None = None) -> Cluster:
        """A preset name or a cluster JSON file (as written by `autoplan profile`)."""
        if name_or_path.endswith(".json") or Path(name_or_path).is_file():
            cluster = cls.load(name_or_path)
            return cluster.with_gpus(gpus) if gpus is not None else cluster
        return cls.preset(name_or_path, gpus)

    def with_gpus(self, gpus: int) -> Cluster:
        if not 1 <= gpus <= MAX_GPUS:
            raise InvalidInputError(f"--gpus must be between 1 and {MAX_GPUS:,}, got {gpus}")
        return self.model_copy(update={"num_gpus": gpus})


STACKS_DIR = PRESETS_DIR / "stacks"


class Stack(_Noun):
    """The software that runs a plan: which kernels it launches, what it fuses, in what precision.

    The same plan on the same GPUs runs at different speeds under Megatron-LM with fused kernels, eager
    PyTorch and torch.compile; the cost model takes the stack as an input instead of hiding it in a
    constant. Presets (autoplan/profiler/presets/stacks/*.json) carry a source for each number."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    name: str = Field(description="Preset name or a label.")
    description: str = Field("", description="What software this is.")
    memory_bound_traffic: float = Field(1.0, gt=0, le=2, description="HBM bytes the stack's element-wise, normalisation "
                                                                      "and softmax kernels move, as a fraction of what the "
                                                                      "eager trace's ops move one by one (fusion moves fewer).")
    attention_speedup: float = Field(1.0, gt=0, le=4, description="Speed of the stack's fused attention kernel relative to "
                                                                  "the FlashAttention-2-class kernel the cluster's "
                                                                  "attention_efficiency describes (FA3/cuDNN on Hopper > 1).")
    zero3_collectives_per_block: int = Field(1, ge=1, le=64, description="All-gathers (and reduce-scatters) a ZeRO-3 step issues per "
                                                                          "transformer block and pass: 1 where a block is one FSDP unit; "
                                                                          "more where parameters are gathered module by module.")
    selective_recompute: Literal["autoplan", "attention-core", "every-other-mm", "modules"] = Field(
        "autoplan", description="What plan.recompute='selective' reruns: autoplan's rule (autoplan.selective: element-wise "
                                "ops, SP's all-gathers, eager attention scores); Korthikanti et al.'s (the attention "
                                "core only), as Megatron-LM does; torchtitan's op-level policy (autoplan's, but the "
                                "block's 2nd, 4th, ... matmul in forward order is recomputed, not kept); or the modules "
                                "of `recompute_modules` (Megatron-LM's recompute_modules).")
    recompute_modules: list[Literal["core_attn", "mla_up_proj", "mlp"]] = Field(
        default_factory=lambda: ["core_attn"], description="With selective_recompute 'modules': Megatron-LM's modules "
        "recomputed (core_attn: the attention core; mla_up_proj: MLA's query/key/value up-projections; mlp: a dense "
        "MLP whole). Megatron-LM's moe_act, layernorm, moe and shared_experts are not modelled.")
    optimizer_step_bytes: float = Field(28.0, gt=0, le=1000, description="HBM bytes the optimizer step moves per parameter of "
                                                                        "the rank's shard: 28 for a fused AdamW with fp32 "
                                                                        "states (read/write parameter, gradient, two moments); "
                                                                        "more where each element-wise op is its own pass.")
    vocab_parallel_loss: bool = Field(False, description="Under tensor parallelism the loss runs on vocabulary-sharded logits "
                                                         "(Megatron-LM's vocab-parallel cross-entropy, torch's loss_parallel); "
                                                         "false: the logits are all-gathered first, as autoplan's executor does.")
    fused_loss: bool = Field(False, description="The loss is a fused, chunked cross-entropy kernel that keeps the 16-bit "
                                                "logits and writes their gradient in place (no fp32 copies of the logits).")
    fp8_linears: bool = Field(False, description="Linear layers run in float8 (2x the bf16 tensor-core peak on Hopper) "
                                                 "with per-tensor scaling casts around them.")
    fp8_experts: bool = Field(False, description="With fp8_linears, a MoE layer's experts (routed and shared) run in float8 "
                                                 "too (TransformerEngine's grouped linears under Megatron-LM's fp8 recipes); "
                                                 "false: experts in bf16 (torchao's Float8Linear converts nn.Linear only).")
    moe_dispatcher: Literal["all-to-all", "all-gather", "node-dedup"] = Field(
        "all-to-all", description="How a MoE layer moves tokens to the ranks holding their experts: all-to-all "
                                  "(autoplan's executor, Megatron-LM's alltoall dispatcher: one copy per chosen "
                                  "expert), all-gather (every rank gathers all tokens of its ep group; Megatron-LM's "
                                  "allgather dispatcher) or node-dedup (DeepEP / HybridEP behind Megatron-LM's flex "
                                  "dispatcher: a token crosses to each node holding its experts once, then fans out "
                                  "over NVLink).")
    moe_capacity_factor: float | None = Field(None, gt=0, le=1024, description="Token drop: an expert takes at most this "
                                              "multiple of its balanced share T·k/E and drops the rest (Megatron-LM's "
                                              "moe_expert_capacity_factor, GShard's capacity). None: dropless (autoplan's "
                                              "executor).")
    moe_pad_to_capacity: bool = Field(False, description="With a capacity factor, every expert receives and computes exactly "
                                                         "its capacity, padded (Megatron-LM's moe_pad_expert_input_to_capacity).")
    fused_moe_activations: bool = Field(False, description="A MoE layer keeps what a fused MoE path keeps for backward "
                                                           "(Megatron-Core's grouped experts with fused permutation: "
                                                           "costmodel.experts.fused_moe_kept_bytes_per_token) instead of the "
                                                           "traced eager module's tensors; in the papers' memory accounting.")
    moe_a2a_overlap: bool = Field(False, description="The dispatcher's communication of one micro-batch runs beside the "
                                                     "compute of another (Megatron-LM's overlap_moe_expert_parallel_comm "
                                                     "with delay_wgrad_compute); false: on the critical path.")
    grouped_gemm: bool = Field(False, description="A rank's experts run as one grouped GEMM (Megatron-LM's "
                                                  "GroupedGEMM, MegaBlocks) instead of one GEMM per expert.")
    dp_sync: Literal["overlapped", "autoplan"] = Field(
        "overlapped", description="How ZeRO 0/1 synchronise over the replicas: 'overlapped' (Megatron-LM's bucketed "
                                  "gradient reduction beside backward and parameter all-gather beside the next "
                                  "forward); 'autoplan' (its executor: DDP's buckets beside backward only without "
                                  "tp and pp, else one reduction after backward; ZeRO-1's bucketed all-gather "
                                  "inside the optimizer step).")
    sources: dict[str, str] = Field(default_factory=dict, description="Where each number comes from.")

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(p.stem for p in STACKS_DIR.glob("*.json"))

    @classmethod
    def preset(cls, name: str) -> Stack:
        """A built-in stack: torch (eager PyTorch, what autoplan's executor runs), torch-compile,
        megatron-2021, megatron-te, llm-foundry."""
        path = STACKS_DIR / f"{name}.json"
        if not path.is_file():
            raise InvalidInputError(f"unknown stack {name!r}; stacks: {', '.join(cls.presets())}")
        return cls.load(path)

    @classmethod
    def resolve(cls, name_or_path: str | None) -> Stack:
        """A preset name, a stack JSON file, or None for the default (eager PyTorch)."""
        if name_or_path is None:
            return cls.preset("torch")
        if name_or_path.endswith(".json") or Path(name_or_path).is_file():
            return cls.load(name_or_path)
        return cls.preset(name_or_path)


# ----------------------------------------------------------------------------------------- how
def chunks_per_rank(schedule: str, virtual_stages: int) -> int:
    """Model chunks a pipeline rank holds: gpipe and 1f1b have one whatever virtual_stages says."""
    return virtual_stages if schedule in ("interleaved-1f1b", "zero-bubble") else 1


class Plan(_Noun):
    """How to train: parallel degrees, sharding, recomputation, batch and pipeline schedule."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    dp: int = Field(1, ge=1, le=MAX_GPUS, description="Data-parallel degree.")
    tp: int = Field(1, ge=1, le=MAX_GPUS, description="Tensor-parallel degree (Megatron column/row split).")
    pp: int = Field(1, ge=1, le=MAX_GPUS, description="Pipeline stages.")
    cp: int = Field(1, ge=1, le=MAX_GPUS, description="Context-parallel degree (sequence split across ranks, ring attention).")
    ep: int = Field(1, ge=1, le=MAX_GPUS, description="Expert-parallel degree for MoE layers (folded over dp*cp*tp ranks).")
    etp: int = Field(1, ge=1, le=MAX_GPUS, description="Expert tensor-parallel degree: each routed expert's FFN split over "
                                                       "etp ranks (column/row), folded with ep over dp*cp*tp ranks "
                                                       "(Megatron-Core's expert_tensor_parallel_size). 1: experts whole.")
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters (FSDP).")
    recompute: Recompute = Field("none", description="Activation recomputation: none, selective (attention core) or full.")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism on the tp group (no effect when tp=1).")
    micro_batch_size: int = Field(1, ge=1, le=MAX_GLOBAL_BATCH, description="Sequences per micro-batch per data-parallel replica.")
    global_batch_size: int = Field(ge=1, le=MAX_GLOBAL_BATCH, description="Sequences per optimizer step, all replicas together.")
    schedule: Schedule = Field("1f1b", description="Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, zero-bubble.")
    virtual_stages: int = Field(1, ge=1, le=1024, description="Model chunks per pipeline rank (interleaved schedules).")
    layers_per_stage: list[int] | None = Field(None, description="Blocks per pipeline chunk (pp*virtual_stages entries); None: as even as possible.")
    recompute_per_stage: list[Recompute] | None = Field(None, description="Recompute per pipeline stage (pp entries), overriding `recompute`.")
    offload: Offload = Field("none", description="What lives in host memory: none; optimizer (fp32 master weights and "
                                                 "moments, the Adam step on the CPU: ZeRO-Offload); params (also the "
                                                 "sharded parameters and gradients: FSDP2's CPUOffloadPolicy, zero_stage 3).")

    @model_validator(mode="after")
    def _self_consistent(self) -> Plan:
        if self.global_batch_size % self.dp:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by dp={self.dp}")
        per_replica = self.global_batch_size // self.dp
        if per_replica % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} does not divide the "
                             f"{per_replica} sequences per data-parallel replica")
        if self.virtual_stages > 1 and self.schedule not in ("interleaved-1f1b", "zero-bubble"):
            raise ValueError(f"virtual_stages={self.virtual_stages} needs schedule interleaved-1f1b or zero-bubble, not {self.schedule}")
        if self.virtual_stages > 1 and self.pp == 1:
            raise ValueError(f"virtual_stages={self.virtual_stages} needs pp > 1")
        chunks = self.pp * self.virtual_stages
        if self.layers_per_stage is not None and len(self.layers_per_stage) != chunks:
            raise ValueError(f"layers_per_stage has {len(self.layers_per_stage)} entries but pp*virtual_stages = {chunks}")
        if self.recompute_per_stage is not None and len(self.recompute_per_stage) != self.pp:
            raise ValueError(f"recompute_per_stage has {len(self.recompute_per_stage)} entries but pp = {self.pp}")
        if self.offload == "params" and self.zero_stage != 3:
            raise ValueError(f"offload=params needs zero_stage 3 (FSDP2's CPUOffloadPolicy), not {self.zero_stage}")
        if self.etp > 1 and (self.dp * self.cp * self.tp) % (self.ep * self.etp):
            raise ValueError(f"ep*etp = {self.ep}*{self.etp} does not divide dp*cp*tp = {self.dp * self.cp * self.tp}")
        return self

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def expert_data_parallel(self) -> int:
        """Ranks holding the same expert shards: the dp x cp x tp ranks of a stage, ep x etp of them splitting
        the experts (ep by experts, etp each expert's width)."""
        return self.dp * self.cp * self.tp // (self.ep * self.etp)

    @property
    def expert_sharded(self) -> bool:
        """Experts are split over ranks (ep or etp > 1): the executor builds the expert mesh for them."""
        return self.ep * self.etp > 1

    @property
    def chunks_per_rank(self) -> int:
        return chunks_per_rank(self.schedule, self.virtual_stages)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.dp * self.micro_batch_size)

    def stage_recompute(self, stage: int) -> Recompute:
        return self.recompute_per_stage[stage] if self.recompute_per_stage else self.recompute

    def describe(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}", f"cp={self.cp}", f"ep={self.ep}",
                 *([f"etp={self.etp}"] if self.etp > 1 else []), f"zero={self.zero_stage}", f"recompute={self.recompute}",
                 f"sp={'on' if self.sequence_parallel and self.tp > 1 else 'off'}",
                 f"mbs={self.micro_batch_size}", f"gbs={self.global_batch_size}", f"schedule={self.schedule}"]
        if self.virtual_stages > 1:
            parts.append(f"v={self.virtual_stages}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        return " ".join(parts)


def check_plan(profile: ModelProfile, cluster: Cluster, plan: Plan) -> None:
    """Raise InvalidPlanError with the numbers if the plan contradicts the model or the cluster."""
    if plan.gpus != cluster.num_gpus:
        raise InvalidPlanError(f"dp*tp*pp*cp = {plan.dp}*{plan.tp}*{plan.pp}*{plan.cp} = {plan.gpus} "
                               f"but the cluster has {cluster.num_gpus} GPUs")
    if profile.num_heads and profile.num_heads % plan.tp:
        raise InvalidPlanError(f"tp={plan.tp} does not divide {profile.num_heads} heads")
    if profile.num_kv_heads and profile.num_kv_heads % plan.tp:
        raise InvalidPlanError(f"tp={plan.tp} does not divide {profile.num_kv_heads} key/value heads")
    chunks = plan.pp * plan.virtual_stages
    if chunks > profile.num_blocks:
        raise InvalidPlanError(f"pp*virtual_stages = {chunks} exceeds the model's {profile.num_blocks} layers")
    if plan.layers_per_stage is not None:
        if min(plan.layers_per_stage) < 0 or sum(plan.layers_per_stage) != profile.num_blocks:
            raise InvalidPlanError(f"layers_per_stage sums to {sum(plan.layers_per_stage)} "
                                   f"but the model has {profile.num_blocks} layers")
    if plan.cp > 1 and profile.seq_len % (2 * plan.cp):
        raise InvalidPlanError(f"cp={plan.cp} needs seq_len divisible by 2*cp = {2 * plan.cp}, got {profile.seq_len}")
    if plan.ep > 1:
        if not profile.num_experts:
            raise InvalidPlanError(f"ep={plan.ep} but the model has no experts")
        if profile.num_experts % plan.ep:
            raise InvalidPlanError(f"ep={plan.ep} does not divide {profile.num_experts} experts")
        if (plan.dp * plan.cp * plan.tp) % plan.ep:
            raise InvalidPlanError(f"ep={plan.ep} does not divide dp*cp*tp = {plan.dp * plan.cp * plan.tp}")
    if plan.etp > 1:
        if not profile.num_experts:
            raise InvalidPlanError(f"etp={plan.etp} but the model has no experts")
        width = profile.expert_ffn_hidden
        if width and width % plan.etp:
            raise InvalidPlanError(f"etp={plan.etp} does not divide the experts' width {width}")


class PlanFile(_Noun):
    """A plan as `autoplan search --out` writes it: the plan, what it was made for, and its estimate."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    plan: Plan = Field(description="The plan to run.")
    model: str = Field(description="Model (built-in name or model.py path) the plan was made for.")
    seq_len: int = Field(description="Sequence length it was planned at.")
    cluster: str = Field(description="Cluster preset or file it was planned on.")
    gpu: str = Field(description="GPU model of that cluster.")
    gpus: int = Field(description="GPUs it was planned for.")
    estimate: Estimate | None = Field(None, description="The cost model's estimate at planning time.")
    command: str | None = Field(None, description="The command that made it.")


def parse_plan_file(text: str, source: str = "plan") -> tuple[Plan, PlanFile | None]:
    """A Plan from JSON text (a bare plan or a PlanFile), or InvalidInputError naming what is wrong."""
    data = parse_json(text, source)
    try:
        if isinstance(data, dict) and isinstance(data.get("plan"), dict):
            if {"model", "gpus"} <= data.keys():
                origin = PlanFile.model_validate(data)
                return origin.plan, origin
            return Plan.model_validate(data["plan"]), None
        return Plan.model_validate(data), None
    except ValidationError as err:
        raise InvalidInputError(f"{source}: {one_line(err)}") from None


def parse_plan(text: str, source: str = "plan") -> Plan:
    """A Plan from JSON text (a bare plan or a plan file), or InvalidInputError with one line."""
    return parse_plan_file(text, source)[0]


# ----------------------------------------------------------------------------------------- answer
class Estimate(_Noun):
    """What the cost model predicts for (ModelProfile, Cluster, Plan)."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    step_time_s: float = Field(description="Time of one optimizer step.")
    tokens_per_s: float = Field(description="Training throughput of the whole job.")
    mfu: float = Field(description="Model FLOPs utilisation: model FLOPs per second / (GPUs x peak).")
    model_flops_per_gpu_per_s: float = Field(description="Model FLOPs (no recompute) per second per GPU.")
    hardware_flops_per_gpu_per_s: float = Field(description="FLOPs executed per second per GPU, recompute included.")
    memory_per_gpu_bytes: int = Field(description="Peak memory of the fullest rank.")
    memory_limit_bytes: int = Field(description="GPU memory per rank.")
    fits: bool = Field(description="memory_per_gpu_bytes <= memory_limit_bytes (and the host memory within its limit).")
    host_memory_per_gpu_bytes: int = Field(0, description="Host memory the fullest rank's offloaded states take (Plan.offload).")
    host_memory_limit_bytes: int = Field(0, description="Host memory per GPU (Cluster.host_memory_per_gpu_bytes).")
    step_time_band_s: tuple[float, float] | None = Field(None, description="Where the step time falls for most runs: the "
                                                                            "cross-validated error band of the published runs "
                                                                            "(costmodel.bands) around step_time_s.")
    memory_band_bytes: tuple[int, int] | None = Field(None, description="memory_per_gpu_bytes within the dry-run grid's "
                                                                         "tolerance (costmodel.bands).")
    memory_at_risk: bool = Field(False, description="Fits by the estimate, but the top of memory_band_bytes does not.")
    peak_stage: int = Field(0, description="Pipeline stage whose ranks hold the most memory.")
    memory_per_stage_bytes: list[int] = Field(default_factory=list, description="Peak memory per GPU of each pipeline stage.")
    time_breakdown: dict[str, float] = Field(description="Seconds of the step by cause (compute, recompute, tp_comm, ...).")
    memory_breakdown: dict[str, int] = Field(description="Bytes of the peak rank by category (params, grads, optimizer, ...).")
    notes: list[str] = Field(default_factory=list, description="Assumptions the estimate made that the user should know.")



class StageMemory(_Noun):
    """One pipeline stage's fullest rank in a dry run: its peak tensor memory and what it holds then."""

    stage: int = Field(description="Pipeline stage (0 for a plan without pipeline).")
    rank: int = Field(description="Global rank that was run (dp, cp, tp and ep coordinates 0: the largest shards).")
    peak_memory_bytes: int = Field(description="Peak bytes of tensors on this rank's GPU.")
    memory_breakdown: dict[str, int] = Field(description="Bytes at the peak by category: params, grads, optimizer, "
                                                         "activations, temporaries, buffers.")
    peak_phase: str = Field(description="When the peak happened, e.g. 'step 2 backward'.")
    host_memory_bytes: int = Field(0, description="Most bytes of offloaded states in host memory (Plan.offload).")
    fwd_s: float | None = Field(None, description="Time dry run: seconds of one micro-batch's forward on this rank "
                                                  "(compute and exposed communication, priced by costmodel.trace_time).")
    bwd_s: float | None = Field(None, description="Time dry run: seconds of one micro-batch's backward, recompute included.")
    after_backward_s: float | None = Field(None, description="Time dry run: seconds after the last backward (gradient "
                                                             "averaging, optimizer step).")
    trace_ops: int | None = Field(None, description="Time dry run: events recorded in this rank's traced step.")


class DryRunResult(_Noun):
    """What a dry run measured: the executor's own code run for one rank of an N-rank job on a fake process
    group with fake tensors, every tensor byte counted (executor.dryrun)."""

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file format.")
    model: str = Field(description="Model that was run (built-in name, model.py path or class name).")
    plan: Plan = Field(description="The plan that was applied.")
    gpus: int = Field(description="Ranks of the simulated job (dp*tp*pp*cp).")
    seq_len: int = Field(description="Tokens per sequence.")
    precision: str = Field(description="Dtypes of the run: parameters, gradients, optimizer states.")
    steps: int = Field(description="Training steps run (forward, backward, optimizer).")
    micro_batches_per_step: int = Field(description="Micro-batches run per step (a memory-equivalent number; "
                                                    "the plan's may be larger).")
    peak_memory_bytes: int = Field(description="Peak tensor bytes per GPU of the fullest rank (no reserve).")
    host_memory_bytes: int = Field(0, description="Bytes of offloaded states in host memory of that rank (Plan.offload): "
                                                   "counted apart, not in peak_memory_bytes.")
    memory_breakdown: dict[str, int] = Field(description="Bytes of the fullest rank at its peak by category.")
    peak_stage: int = Field(0, description="Pipeline stage of the fullest rank.")
    stages: list[StageMemory] = Field(default_factory=list, description="Each pipeline stage that was run.")
    wall_s: float = Field(0.0, description="Seconds the dry run took.")
    notes: list[str] = Field(default_factory=list, description="How the dry run departed from a real run.")
    step_time_s: float | None = Field(None, description="Time dry run (time=True): seconds per training step, the "
                                                        "traced ops priced on the cluster (costmodel.trace_time).")
    time_breakdown: dict[str, float] | None = Field(None, description="Time dry run: step_time_s by the estimate's "
                                                                      "categories (compute, tp_comm, pp_bubble, ...).")
    cluster: str | None = Field(None, description="Time dry run: the cluster whose formulas priced the trace.")
    _traces: dict = PrivateAttr(default_factory=dict)

    @property
    def traces(self) -> dict:
        """Time dry run: pipeline stage -> its traced step (a list of costmodel.trace_time.TraceEvent)."""
        return self._traces

    def fits(self, cluster: Cluster) -> bool:
        """Peak tensor memory plus the cluster's reserve (context, NCCL, fragmentation) within GPU memory, and the
        offloaded states within the host memory per GPU."""
        host_ok = not self.host_memory_bytes or self.host_memory_bytes <= cluster.host_memory_per_gpu_bytes
        return self.peak_memory_bytes + cluster.memory_reserve_bytes <= cluster.memory_bytes and host_ok


PlanFile.model_rebuild()
