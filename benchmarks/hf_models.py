"""Hugging Face models at real size through profile -> search -> estimate -> dry run, as a new user runs
them (examples/hf/*/config.json, built by transformers on meta): parameters against transformers' own count,
training FLOPs per token against the formula 6·N + 14·L·h·s (N: the parameters in matrix products, the
active ones for MoE: Kaplan et al. 2020; attention: Q K^T and P V, 4·s·h per token and layer forward, twice
that backward, the 12·L·h·s of Chowdhery et al. 2022, App. B, counted whole (not halved for causality) as
torch's flop counter does, plus the Q K^T a fused attention's backward recomputes: 2·L·h·s), and the dry run's peak memory against the estimate of the best plan found.

    python -m benchmarks.hf_models          # writes benchmarks/results/hf_models.md
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import autoplan as ap
from autoplan.models.hf import hf_config
from autoplan.support import unsupported_reason

RESULTS = Path(__file__).parent / "results" / "hf_models.md"
# (config folder, built-in model of the same shape or None, seq_len, GPUs, global batch)
MODELS = [
    ("examples/hf/llama3-8b", "llama3-8b", 8192, 64, 256),
    ("examples/hf/mixtral-8x7b", "mixtral-8x7b", 4096, 64, 256),
    ("examples/hf/qwen2-7b", None, 4096, 64, 256),
    ("examples/hf/qwen1.5-moe-a2.7b", None, 4096, 64, 256),
    ("examples/hf/gpt2", None, 1024, 8, 64),
]


def matmul_params(config) -> float:
    """Parameters in the matrix products of one token's forward (biases, norms and the lookup tables left
    out; for MoE the routed experts' top_k of num_experts, the router and any shared expert)."""
    if config.model_type == "gpt2":
        h = config.n_embd
        return config.n_layer * 12 * h * h + h * config.vocab_size
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attention = 2 * h * config.num_attention_heads * head_dim + 2 * h * config.num_key_value_heads * head_dim
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        top_k = config.num_experts_per_tok
        ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        mlp = top_k * 3 * h * ffn + h * experts + (3 * h * shared + h if shared else 0)
    else:
        mlp = 3 * h * config.intermediate_size
    return layers * (attention + mlp) + h * config.vocab_size


def formula_flops_per_token(config, seq_len: int) -> float:
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return 6 * matmul_params(config) + 14 * layers * hidden * seq_len


def hf_parameters(path: str) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(path)).num_parameters()


def measure(path: str, builtin: str | None, seq_len: int, gpus: int, batch: int) -> dict:
    config = hf_config(path)
    start = time.perf_counter()
    profile = ap.profile_model(path, seq_len=seq_len)
    profile_s = time.perf_counter() - start
    row = {"model": Path(path).name, "seq_len": seq_len, "params": profile.total_params,
           "hf_params": hf_parameters(path), "flops_per_token": profile.train_flops_per_sequence / seq_len,
           "formula_flops_per_token": formula_flops_per_token(config, seq_len), "profile_s": profile_s,
           "notes": profile.notes}
    if builtin:
        reference = ap.profile_model(builtin, seq_len=seq_len)
        row["builtin"] = builtin
        row["builtin_params"] = reference.total_params
        row["builtin_flops_per_token"] = reference.train_flops_per_sequence / seq_len
    cluster = ap.Cluster.preset("dgx-h100", gpus=gpus)
    result = ap.search(profile, cluster, global_batch_size=batch, top_k=1,
                       accept=lambda plan: unsupported_reason(plan, moe=profile.num_experts > 0, foreign=True) is None)
    plan, estimate = result.best, result.best_estimate
    start = time.perf_counter()
    dry = ap.dryrun(path, plan, gpus=gpus, seq_len=seq_len)
    row.update(plan=_describe(plan), dry_run_bytes=dry.peak_memory_bytes, dry_run_s=time.perf_counter() - start,
               estimate_bytes=estimate.memory_per_gpu_bytes - estimate.memory_breakdown.get("reserve", 0))
    return row


def _describe(plan) -> str:
    parts = [f"{name}={getattr(plan, name)}" for name in ("dp", "tp", "pp", "cp", "ep") if getattr(plan, name) > 1]
    parts += [f"ZeRO-{plan.zero_stage}", f"mbs {plan.micro_batch_size}", plan.recompute]
    if plan.pp > 1:
        parts.append(plan.schedule)
    return " ".join(parts)


def main() -> None:
    rows = [measure(*spec) for spec in MODELS]
    lines = ["# Hugging Face models at real size (`python -m benchmarks.hf_models`)", "",
             "Each model is its `config.json` under `examples/hf/`, built by transformers on the meta device. "
             "Parameters: the profile against transformers' `num_parameters()`. FLOPs per token (training): the "
             "profile against 6·N + 14·L·h·s (N: parameters in matrix products, active ones for MoE; attention "
             "whole, with the Q K^T that a fused attention's backward recomputes). Memory: the "
             "best plan of a search on a DGX H100 preset, the dry run's peak tensor bytes against the estimate "
             "(tensor bytes, the preset's reserve left out).", "",
             "| model | seq | params (profile) | params (transformers) | GFLOP/token profile | formula | error "
             "| built-in of the same shape: params, GFLOP/token | best plan | estimate GiB | dry run GiB | error |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        flops_error = r["flops_per_token"] / r["formula_flops_per_token"] - 1
        memory_error = r["estimate_bytes"] / r["dry_run_bytes"] - 1
        builtin = (f"{r['builtin']}: {r['builtin_params']:,}, {r['builtin_flops_per_token'] / 1e9:.3f}"
                   if "builtin" in r else "-")
        lines.append(f"| {r['model']} | {r['seq_len']} | {r['params']:,} | {r['hf_params']:,} | "
                     f"{r['flops_per_token'] / 1e9:.3f} | {r['formula_flops_per_token'] / 1e9:.3f} | "
                     f"{flops_error:+.2%} | {builtin} | {r['plan']} | {r['estimate_bytes'] / 2**30:.2f} | "
                     f"{r['dry_run_bytes'] / 2**30:.2f} | {memory_error:+.2%} |")
    notes = [f"- {r['model']}: {note}" for r in rows for note in r["notes"]]
    lines += ["", "Profile notes (what the profiler could not recognize):", *(notes or ["- none"]), "",
              "Times on this 2-core machine: " + ", ".join(f"{r['model']} profile {r['profile_s']:.1f} s, dry run "
                                                           f"{r['dry_run_s']:.1f} s" for r in rows) + "."]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
