"""Where: the GPUs and their links (Cluster, Link, EfficiencyPoint) and the software that runs a plan
(Stack), with the built-in presets of both (autoplan/profiler/presets)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from autoplan.errors import InvalidInputError
from autoplan.schema.base import _FINITE, MAX_GPUS, SCHEMA_VERSION, _Noun

PRESETS_DIR = Path(__file__).parent.parent / "profiler" / "presets"


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
    sequence_shard_copy: bool = Field(True, description="With sequence parallelism a copy of the whole [b, s, h] "
                                                        "activation before each sequence reduce-scatter (DTensor "
                                                        "shards [b, s, h] along dim 1 and reduce-scatters along dim 0, "
                                                        "as autoplan's executor and torchtitan run); false: the "
                                                        "sequence is the leading dim ([s, b, h], Megatron-LM).")
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
