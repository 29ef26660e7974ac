"""Published training runs as (model, cluster, plan, stack) the cost model can estimate.

The runs are facts from papers and public benchmark tables, collected with their sources in
benchmarks/data/published_runs_train.json (its `about` says how; each case names its source and
location). This module turns one case into what autoplan reads, and says which fields it had to
assume where a source is silent (`Case.assumptions`): those assumptions are part of the result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

import autoplan as ap
from autoplan.schema import Stack

DATA = Path(__file__).parent / "data" / "published_runs_train.json"
# runs autoplan adds from the same public sources (the H100 tables of llm-foundry's README), same format
ADDED = Path(__file__).parent / "data" / "published_runs_added.json"
# published MoE runs (benchmarks/published_moe.py predicts them with the values fitted to the dense runs)
MOE = Path(__file__).parent / "data" / "published_runs_moe.json"

SOURCES = {  # a short label per source title prefix (the report groups by these)
    "Narayanan et al.": "megatron-sc21",
    "Korthikanti et al.": "korthikanti-2022",
    "mosaicml/llm-foundry": "llm-foundry",
    "pytorch/torchtitan": "torchtitan",
    "NVIDIA-NeMo/Megatron-Bridge": "megatron-bridge",
}


@dataclass
class Case:
    """One published run, mapped. `published_step_s` is the measured (or derived) time of one step."""

    case_id: str
    source: str
    gpu: str
    model_name: str
    published_step_s: float | None
    published_memory_gib: float | None
    plan: ap.Plan | None
    cluster: ap.Cluster | None
    stack: Stack | None
    family: str = "gpt"
    attention: str = "flash"         # how the stack runs attention: a fused kernel, or eager softmax (scores kept)
    dropout: float = 0.0
    shape: dict = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    skipped: str | None = None       # why the case is not estimated (no step time, a per-layer timing, ...)
    routing_imbalance: float | None = None  # MoE: the busiest ep rank's tokens over the mean, where the source says
    routing_groups: tuple[int, int] = (1, 0)  # MoE: group-limited routing (groups, groups per token), where it is set
    raw: dict = field(default_factory=dict)


def load_raw(path: Path = DATA) -> list[dict]:
    return json.loads(path.read_text())["cases"]


def source_label(case: dict) -> str:
    title = case["source"]["title"] if isinstance(case["source"], dict) else str(case["source"])
    for prefix, label in SOURCES.items():
        if title.startswith(prefix):
            return label
    return title.split(",")[0][:40]


def _gpu(case: dict) -> str:
    gpu = case["hardware"]["gpu_type"]
    if gpu.startswith("H100") and "500W" in gpu:
        return "h100-sxm-500w"
    if gpu.startswith("H100"):
        return "h100-sxm"
    if "40GB" in gpu:
        return "a100-40gb"
    return "a100-80gb"


# cluster preset per GPU, and the inter-node bandwidth a source states (bytes/s per GPU)
CLUSTER_OF_GPU = {"a100-80gb": "dgx-a100-80gb", "a100-40gb": "dgx-a100-40gb", "h100-sxm": "dgx-h100",
                  "h100-sxm-500w": "h100-96gb-500w"}


def _stack(case: dict, source: str) -> Stack:
    cfg = case["config"]
    precision = str(cfg.get("precision") or "")
    fp8 = not precision.startswith("not stated") and ("float8" in precision or "fp8" in precision)
    if source in ("megatron-sc21", "korthikanti-2022"):
        return Stack.preset("megatron-2021")
    if source == "torchtitan":
        name = "torch-compile" if cfg.get("torch_compile") else "torch"
        # torchtitan turns on torch's loss_parallel with TP (its default `disable_loss_parallel = false`),
        # steps a fused AdamW (its default optimizer implementation "fused"): 28 bytes per parameter, and its
        # selective recompute is the op-level policy (selective_ac_option "op", its Llama configs' setting),
        # which keeps every matmul output but every second one of a block
        return Stack.preset(name).model_copy(update={"fp8_linears": fp8, "vocab_parallel_loss": True,
                                                     "optimizer_step_bytes": 28.0,
                                                     "selective_recompute": "every-other-mm"})
    if source == "megatron-bridge":
        # Megatron-Core with Transformer Engine: experts as TE grouped GEMMs, in float8 with the fp8 recipes; what
        # the run's recipe sets beyond the table's columns (its `recipe` block, carried into config): the
        # dispatcher, token drop, the dispatcher's overlap and the modules selective recompute reruns
        modules = cfg.get("recompute_modules")
        return Stack.preset("megatron-te").model_copy(update={
            "fp8_linears": fp8, "fp8_experts": fp8, "grouped_gemm": True, "fused_moe_activations": True,
            "moe_dispatcher": cfg.get("dispatcher", "all-to-all"), "moe_a2a_overlap": bool(cfg.get("moe_a2a_overlap")),
            "moe_capacity_factor": cfg.get("capacity_factor"), "moe_pad_to_capacity": bool(cfg.get("pad_to_capacity")),
            **({"selective_recompute": "modules", "recompute_modules": list(modules)} if modules else {})})
    return Stack.preset("llm-foundry").model_copy(update={"fp8_linears": fp8})


def _recompute(text: str | None) -> str:
    text = (text or "none").lower()
    return "full" if text.startswith("full") else "selective" if text.startswith("selective") else "none"


def _int(value, default: int = 1) -> int:
    return int(value) if value not in (None, "") else default


def map_case(raw: dict) -> Case:
    source, gpu = source_label(raw), _gpu(raw)
    model, hw, cfg, out = raw["model"], raw["hardware"], raw["config"], raw.get("outcome", {})
    derived = raw.get("derived") or {}
    step = out.get("step_time_s") or derived.get("step_time_s")
    memory = out.get("peak_memory_GiB")
    case = Case(case_id=raw["case_id"], source=source, gpu=gpu, model_name=model.get("name", ""),
                published_step_s=step, published_memory_gib=memory, plan=None, cluster=None, stack=None, raw=raw)
    if raw.get("case_type") != "throughput":
        case.skipped = f"a {raw.get('case_type')} case, not a training step"
        return case
    if not step:
        case.skipped = "no step time published"
        return case
    gpus = _int(hw.get("num_gpus"))
    tp, pp, cp = _int(cfg.get("tp")), _int(cfg.get("pp")), _int(cfg.get("cp"))
    dp = gpus // (tp * pp * cp)
    seq = _int(model.get("seq_len"), 2048)
    if model.get("builtin"):  # a published architecture autoplan builds by name (autoplan.models.configs)
        case.family, case.shape = "builtin", {"builtin": model["builtin"], "seq_len": seq}
        layers = ap.models.named_config(model["builtin"])["layers"]
    else:
        case.family = "llama" if model.get("kv_heads") else "gpt"
        case.shape = {"layers": model["layers"], "hidden": model["hidden"], "heads": model["heads"],
                      "kv_heads": model.get("kv_heads"), "ffn_hidden": model.get("ffn_hidden") or 4 * model["hidden"],
                      "vocab": model.get("vocab") or 51200, "seq_len": seq}
        layers = model["layers"]
    if str(cfg.get("routing", "")).startswith("force-balanced"):
        case.routing_imbalance = 1.0
    if cfg.get("routing_groups"):
        case.routing_groups = (int(cfg["routing_groups"]), int(cfg.get("routing_group_top_k") or 0))
    if "not stated" in str(cfg.get("precision", "")):
        case.assumptions.append("BF16 (precision not stated)")
    mbs = cfg.get("micro_batch")
    gbs = cfg.get("global_batch")
    if source == "torchtitan":
        # torchtitan states the local batch per data-parallel rank (its "local batch size"); with pp it
        # is split into micro-batches of 1 (torchtitan's pipeline default, not stated in the table)
        local = _int(mbs)
        gbs = gbs or local * dp
        mbs = 1 if pp > 1 else local
        if pp > 1:
            case.assumptions.append("pipeline micro-batch 1 (torchtitan default; the table states the local batch)")
    if gbs is None:
        gbs = _int(mbs) * dp
    if mbs is None:
        mbs = 1
        case.assumptions.append("micro-batch 1 (not stated)")
    schedule_text = str(cfg.get("pipeline_schedule") or "").lower()
    schedule, v = "1f1b", 1
    if pp > 1 and "interleav" in schedule_text:
        schedule = "interleaved-1f1b"
        match = re.search(r"(\d+) (?:interleaving )?stages", schedule_text)
        v = int(match.group(1)) if match else 2
        if not match:
            case.assumptions.append("2 virtual stages (count not stated)")
        v = min(v, layers // pp)  # uneven chunks are allowed (the cost model splits the remainder)
        if v == 1:
            schedule = "1f1b"
    elif pp > 1 and _int(cfg.get("vp")) > 1:  # a virtual-pipeline size (Megatron's VP column): interleaved 1F1B
        schedule, v = "interleaved-1f1b", min(_int(cfg.get("vp")), layers // pp)
    zero = cfg.get("zero_stage")
    if source == "torchtitan":
        # torchtitan shards parameters with FSDP2 over the data-parallel and context-parallel ranks together
        zero = 3 if dp * cp > 1 else 0
    elif zero is None:
        zero = 3 if cfg.get("fsdp") and _int(cfg.get("fsdp")) > 1 else 0
    recompute = _recompute(cfg.get("recompute"))
    sp = bool(cfg.get("sp")) or (source == "torchtitan" and tp > 1)
    try:
        case.plan = ap.Plan(dp=dp, tp=tp, pp=pp, cp=cp, ep=_int(cfg.get("ep")), zero_stage=int(zero), recompute=recompute,
                            sequence_parallel=sp and tp > 1, micro_batch_size=int(mbs), global_batch_size=int(gbs),
                            schedule=schedule, virtual_stages=v, layers_per_stage=cfg.get("layers_per_chunk"))
    except Exception as err:  # a source's numbers that do not make a plan: say so, do not guess
        case.skipped = f"configuration does not make a plan: {err}"
        return case
    case.cluster = ap.Cluster.preset(CLUSTER_OF_GPU[gpu], gpus=gpus)
    case.stack = _stack(raw, source)
    if source in ("megatron-sc21", "korthikanti-2022"):
        # Megatron-LM's GPT of 2021-22: softmax attention in explicit kernels (no flash attention yet), dropout 0.1
        case.attention, case.dropout = "eager", 0.1
    return case


@lru_cache(maxsize=None)
def profile_of(family: str, attention: str, dropout: float, layers: int, hidden: int, heads: int, kv_heads: int | None, ffn_hidden: int, vocab: int,
               seq_len: int) -> ap.ModelProfile:
    """The published model built from its shape on meta and profiled as its stack ran it."""
    with torch.device("meta"):
        if family == "llama":
            model = ap.models.llama(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                                    ffn_hidden=ffn_hidden, vocab=vocab, seq_len=seq_len)
        else:
            model = ap.models.gpt(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq_len,
                                  ffn_hidden=ffn_hidden, dropout=dropout,
                                  attn_impl="eager" if attention == "eager" else "sdpa")
    return ap.profile_model(model, name=f"{family}-{layers}x{hidden}-s{seq_len}", attention=attention)


@lru_cache(maxsize=None)
def _builtin_profile(name: str, seq_len: int) -> ap.ModelProfile:
    return ap.profile_model(name, seq_len=seq_len)


@lru_cache(maxsize=None)
def profile_of_builtin(name: str, seq_len: int, routing_imbalance: float | None,
                       routing_groups: tuple[int, int] = (1, 0)) -> ap.ModelProfile:
    """A built-in published model (autoplan.models.configs) at the run's sequence length (and routing
    imbalance and group-limited routing, where the source states them)."""
    update = {"routing_groups": routing_groups[0], "routing_group_top_k": routing_groups[1]}
    if routing_imbalance is not None:
        update["routing_imbalance"] = routing_imbalance
    return _builtin_profile(name, seq_len).model_copy(update=update)


def profile_case(case: Case) -> ap.ModelProfile:
    s = case.shape
    if case.family == "builtin":
        return profile_of_builtin(s["builtin"], s["seq_len"], case.routing_imbalance, case.routing_groups)
    return profile_of(case.family, case.attention, case.dropout, s["layers"], s["hidden"], s["heads"], s["kv_heads"], s["ffn_hidden"], s["vocab"],
                      s["seq_len"])


def cases(paths: tuple[Path, ...] = (DATA, ADDED)) -> list[Case]:
    return [map_case(raw) for path in paths for raw in load_raw(path)]
