"""The timeline of one pipeline step: which rank runs which micro-batch's forward or backward when.

Each rank runs its operations in the order its schedule prescribes; an operation starts when the rank is
free and its inputs have arrived (the previous stage's forward of that micro-batch, the next stage's
backward). Orders:
  gpipe             all forwards, then all backwards (Huang et al. 2019);
  1f1b              p - r - 1 warm-up forwards, then one forward / one backward, then the cool-down
                    backwards (Narayanan et al. 2021, Sec. 2.2.1);
  interleaved-1f1b  v chunks per rank (chunk c of rank r is stage c·p + r); micro-batches in groups of p,
                    each group through chunk 0, then chunk 1, ...; 2·(p - r - 1) + (v - 1)·p warm-up
                    chunk-forwards, then 1F1B (Megatron-LM's interleaved schedule, Sec. 2.2.2);
  zero-bubble       1f1b with each backward split into B (input gradient) and W (weight gradient), half the
                    backward each; a W runs when its rank would otherwise wait, the rest at the end, which
                    fills the bubbles as ZB-H1 does (Qi et al. 2023); with v > 1 on the interleaved order.
Communication is not drawn (the report's plot shows compute and bubbles).
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.schema import chunks_per_rank


@dataclass(frozen=True)
class Op:
    rank: int
    kind: str          # "F", "B" or "W"
    micro_batch: int
    chunk: int
    start_s: float
    end_s: float


def _orders(schedule: str, pp: int, m: int, v: int) -> list[list[tuple[str, int, int]]]:
    """Per rank, (kind, micro_batch, chunk) in execution order."""
    orders = []
    for r in range(pp):
        if schedule == "gpipe":
            orders.append([("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)])
            continue
        fwd, bwd = _chunk_orders(m, v if schedule in ("interleaved-1f1b", "zero-bubble") else 1, pp)
        warm = len(fwd) if len(fwd) == len(bwd) and m == pp and v > 1 else \
            min(len(fwd), (2 * (pp - r - 1) + (v - 1) * pp) if v > 1 else pp - r - 1)
        order = [("F", i, c) for i, c in fwd[:warm]]
        rest_f, rest_b = fwd[warm:], list(bwd)
        while rest_f:
            i, c = rest_f.pop(0)
            order.append(("F", i, c))
            i, c = rest_b.pop(0)
            order.append(("B", i, c))
        order += [("B", i, c) for i, c in rest_b]
        orders.append(order)
    return orders


def _chunk_orders(m: int, v: int, pp: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(micro_batch, chunk) forward and backward orders: groups of pp micro-batches through each chunk."""
    fwd, bwd = [], []
    for start in range(0, m, pp):
        group = range(start, min(start + pp, m))
        fwd += [(i, c) for c in range(v) for i in group]
        bwd += [(i, c) for c in reversed(range(v)) for i in group]
    return fwd, bwd


def schedule_timeline(*, schedule: str, stage_fwd_s: list[float], stage_bwd_s: list[float], num_micro_batches: int,
                      virtual_stages: int = 1) -> list[Op]:
    """Every operation of one pipeline step with its start and end (rank r: f_r forward and b_r backward per
    micro-batch over all its chunks). Simulated in time order: the operation that can start first runs
    first; under zero-bubble a rank whose next operation cannot start yet runs a pending W instead."""
    pp, m = len(stage_fwd_s), num_micro_batches
    v = chunks_per_rank(schedule, virtual_stages)
    split = schedule == "zero-bubble"
    orders = _orders(schedule, pp, m, v)
    if split:  # W's are not in the order: they fill idle time, and the rest run at the end
        orders = [[op for op in order if op[0] != "W"] for order in orders]
    last = pp * v - 1
    done: dict[tuple[str, int, int], float] = {}   # (kind, micro_batch, stage) -> end time
    free, cursor, ops = [0.0] * pp, [0] * pp, []
    pending: list[list[tuple[int, int]]] = [[] for _ in range(pp)]   # (micro_batch, chunk) awaiting W

    def duration(r: int, kind: str) -> float:
        if kind == "F":
            return stage_fwd_s[r] / v
        return stage_bwd_s[r] / v / (2 if split else 1)

    def arrival(r: int, kind: str, i: int, c: int) -> float | None:
        stage = c * pp + r
        needs = [("F", i, stage - 1)] if kind == "F" and stage > 0 else \
            [("F", i, stage)] + ([("B", i, stage + 1)] if stage < last else []) if kind == "B" else []
        if any(need not in done for need in needs):
            return None
        return max((done[need] for need in needs), default=0.0)

    def candidate(r: int) -> tuple[float, tuple[str, int, int]] | None:
        """The next operation rank r would run and its start, if known."""
        nxt = orders[r][cursor[r]] if cursor[r] < len(orders[r]) else None
        at = arrival(r, *nxt) if nxt else None
        if pending[r] and (nxt is None or at is None or at > free[r]):
            return free[r], ("W", *pending[r][0])
        return (max(free[r], at), nxt) if at is not None else None

    while any(cursor[r] < len(orders[r]) or pending[r] for r in range(pp)):
        options = [(found, r) for r in range(pp) if (found := candidate(r)) is not None]
        if not options:
            raise ValueError(f"{schedule}: the operation orders deadlock (p={pp}, m={m}, v={v})")
        (start, (kind, i, c)), r = min(options, key=lambda item: (item[0][0], item[1]))
        free[r] = start + duration(r, kind)
        done[(kind, i, c * pp + r)] = free[r]
        ops.append(Op(r, kind, i, c, start, free[r]))
        if kind == "W":
            pending[r].pop(0)
        else:
            cursor[r] += 1
            if kind == "B" and split:
                pending[r].append((i, c))
    return ops
