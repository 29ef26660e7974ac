"""How many collectives ZeRO-1's parameter gathers and the gradient reductions by hand issue on one rank: the
executor buckets tensors (executor.zero_one._buckets, executor.data_parallel.all_reduce_in_buckets), and each
collective pays its group's latency."""

from __future__ import annotations

from autoplan.costmodel.experts import is_expert_gemm
from autoplan.costmodel.memory import ZERO1_GATHER_BUCKET_ELEMENTS
from autoplan.schema import LayerProfile


def _local_tensors(layer: LayerProfile, *, tp: int, ep: int, etp: int):
    """(kind "dense" or "expert", elements on one rank, tensors) of `layer`'s parameters: a weight per GEMM (split
    when tensor-parallel), an expert weight stacked over the rank's experts, the rest of the layer's parameters
    (embedding table, norms) one tensor."""
    covered = 0.0
    for g in layer.gemms:
        covered += g.count * g.n * g.k
        if layer.kind == "moe" and is_expert_gemm(gemm=g, num_experts=layer.num_experts):
            yield "expert", layer.num_experts / ep * g.n * g.k / etp, g.count / layer.num_experts
        else:
            yield "dense", g.n * g.k / (tp if g.tp_split != "none" else 1), g.count
    rest = layer.params - covered
    if rest > 0:
        yield "dense", rest / (tp if layer.kind in ("embedding", "head") else 1), 1


def gather_buckets(layers, *, tp: int, ep: int, etp: int) -> tuple[float, float]:
    """(dense, expert) elements per bucket of executor.zero_one's gathers and of the gradient reductions by hand
    (executor.data_parallel.all_reduce_in_buckets) on one rank: ZERO1_GATHER_BUCKET_ELEMENTS, or the largest
    tensor of its kind where that is smaller (a small model's buckets are as large as its largest tensor)."""
    largest = {"dense": 0.0, "expert": 0.0}
    for layer in layers:
        for kind, elements, _ in _local_tensors(layer, tp=tp, ep=ep, etp=etp):
            largest[kind] = max(largest[kind], elements)
    return tuple(min(ZERO1_GATHER_BUCKET_ELEMENTS, size) if size else ZERO1_GATHER_BUCKET_ELEMENTS
                 for size in largest.values())


def param_gathers(*, layer: LayerProfile, tp: int, ep: int, etp: int,
                  buckets: tuple[float, float] | None = None) -> tuple[float, float]:
    """(dense, expert) all-gathers of ZeRO-1's updated chunks for `layer`'s parameters on one rank, as
    executor.zero_one buckets them: a tensor of at least a bucket's elements alone, smaller ones together
    (fractions of a bucket). `buckets`: (dense, expert) elements per bucket (`gather_buckets`; default
    ZERO1_GATHER_BUCKET_ELEMENTS). The gradient reductions by hand follow the same rule."""
    size = dict(zip(("dense", "expert"), buckets or (ZERO1_GATHER_BUCKET_ELEMENTS,) * 2))
    counts = {"dense": [0.0, 0.0], "expert": [0.0, 0.0]}  # [whole tensors, elements in buckets]
    for kind, elements, tensors in _local_tensors(layer, tp=tp, ep=ep, etp=etp):
        if elements >= size[kind]:
            counts[kind][0] += tensors
        else:
            counts[kind][1] += tensors * elements
    return tuple(whole + elements / size[kind] for kind, (whole, elements) in counts.items())
