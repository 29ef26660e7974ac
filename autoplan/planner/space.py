"""The search space: every layout dp*tp*pp*cp = GPUs the model and cluster allow, and the knobs on top.

Divisor generators only; what is worth evaluating is decided in planner.search with lower bounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from autoplan.schema import Cluster, ModelProfile

SCHEDULES_PP = ("1f1b", "gpipe", "zero-bubble", "interleaved-1f1b")
RECOMPUTE = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "params")


@lru_cache(maxsize=4096)
def divisors(n: int) -> tuple[int, ...]:
    """The divisors of n, ascending, from its prime factors (trial division up to the square root of the
    part not yet factored: at most ~sqrt(n) steps for a prime, fast for the bounded GPU counts and batch
    sizes the schema admits, schema.MAX_GPUS and MAX_GLOBAL_BATCH)."""
    if n < 1:
        raise ValueError(f"divisors of {n}")
    found = [1]
    rest, p = n, 2
    while p * p <= rest:
        power = 0
        while rest % p == 0:
            rest //= p
            power += 1
        if power:
            found = [d * p**k for d in found for k in range(power + 1)]
        p += 1 if p == 2 else 2
    if rest > 1:
        found += [d * rest for d in found]
    return tuple(sorted(found))


@dataclass(frozen=True)
class Constraints:
    """What the user allows. Defaults keep tp inside a node, where its per-layer collectives belong."""

    max_tp: int | None = None                 # default: GPUs per node
    max_cp: int = 16
    max_pp: int | None = None                 # default: number of blocks
    max_micro_batch_size: int = 16
    max_virtual_stages: int = 8
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    schedules: tuple[str, ...] = SCHEDULES_PP
    recompute: tuple[str, ...] = RECOMPUTE
    offload: tuple[str, ...] = OFFLOAD        # tried only on a cluster that knows its host (Cluster.can_offload)
    fixed: dict = field(default_factory=dict)  # e.g. {"tp": 8, "pp": 4}: only plans with these values

    def allows(self, name: str, value) -> bool:
        return name not in self.fixed or self.fixed[name] == value


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int = 1


def layouts(profile: ModelProfile, cluster: Cluster, *, global_batch_size: int, constraints: Constraints) -> Iterator[Layout]:
    """Every (dp, tp, pp, cp, ep, etp) with dp*tp*pp*cp = GPUs that the model's shape admits: tp divides the
    heads and key/value heads, cp splits the sequence in 2*cp chunks, pp at most the blocks, dp divides
    the global batch, ep divides the experts, etp their width (`expert_tp_degrees`), and ep*etp the
    dp*cp*tp ranks they fold over."""
    gpus = cluster.num_gpus
    max_tp = constraints.max_tp or cluster.gpus_per_node
    max_pp = min(constraints.max_pp or profile.num_blocks, profile.num_blocks)
    ok = constraints.allows
    for tp in divisors(gpus):
        if tp > max_tp or not ok("tp", tp) or (profile.num_heads and profile.num_heads % tp) \
                or (profile.num_kv_heads and profile.num_kv_heads % tp):
            continue
        for cp in divisors(gpus // tp):
            if cp > constraints.max_cp or not ok("cp", cp) or (cp > 1 and profile.seq_len % (2 * cp)):
                continue
            for pp in divisors(gpus // (tp * cp)):
                dp = gpus // (tp * cp * pp)
                if pp > max_pp or not ok("pp", pp) or not ok("dp", dp) or global_batch_size % dp:
                    continue
                for ep in expert_degrees(profile, dp * cp * tp):
                    if not ok("ep", ep):
                        continue
                    for etp in expert_tp_degrees(profile, folded_ranks=dp * cp * tp, tp=tp, ep=ep,
                                                 max_etp=max_tp, fixed=constraints.fixed.get("etp")):
                        yield Layout(dp, tp, pp, cp, ep, etp)


def expert_degrees(profile: ModelProfile, folded_ranks: int) -> list[int]:
    if not profile.num_experts:
        return [1]
    return [e for e in divisors(profile.num_experts) if folded_ranks % e == 0]


def expert_tp_degrees(profile: ModelProfile, *, folded_ranks: int, tp: int, ep: int, max_etp: int,
                      fixed: int | None = None) -> list[int]:
    """Expert tensor-parallel degrees worth trying beside ep: 1; tp (Megatron-LM's layout before parallel
    folding, expert tp = tp); and, once ep splits every expert apart (ep = E, so only etp can spread the
    experts over more ranks), every divisor of the experts' width up to max_etp (a node). Each must
    divide the experts' width, and ep*etp the folded dp*cp*tp ranks. A pinned value (--fix etp=N) is the
    only candidate, wherever it is valid."""
    width = profile.expert_ffn_hidden
    if not profile.num_experts or not width:
        return [1] if fixed in (None, 1) else []
    if fixed is not None:
        options = [fixed]
    else:
        options = {1, tp} | (set(divisors(width)) if ep == profile.num_experts else set())
        options = sorted(d for d in options if d <= max_etp)
    return [d for d in options if width % d == 0 and folded_ranks % (ep * d) == 0]


def micro_batch_sizes(*, per_replica: int, constraints: Constraints) -> list[int]:
    return [b for b in divisors(per_replica) if b <= constraints.max_micro_batch_size and
            constraints.allows("micro_batch_size", b)]


def schedules(*, pp: int, num_blocks: int, constraints: Constraints) -> list[tuple[str, int]]:
    """(schedule, virtual stages) pairs for a pipeline of pp ranks; one plain entry when pp = 1."""
    if pp == 1:
        return [("1f1b", 1)]
    options = [(s, 1) for s in constraints.schedules if s != "interleaved-1f1b"]
    if "interleaved-1f1b" in constraints.schedules:
        options += [("interleaved-1f1b", v) for v in range(2, constraints.max_virtual_stages + 1)
                    if pp * v <= num_blocks]
    return [(s, v) for s, v in options if constraints.allows("schedule", s) and constraints.allows("virtual_stages", v)]


def offloads(*, zero_stage: int, dp: int, cp: int, ep: int, cluster: Cluster, constraints: Constraints,
             etp: int = 1) -> list[str]:
    """Plan.offload values for a configuration: none always; optimizer and params only on a cluster with host
    memory, link and bandwidth; params only on ZeRO-3 with several replicas and no experts (FSDP2's
    CPUOffloadPolicy on the replicas' mesh)."""
    options = [o for o in constraints.offload if constraints.allows("offload", o)]
    if not cluster.can_offload:
        return [o for o in options if o == "none"]
    return [o for o in options if o != "params" or (zero_stage == 3 and dp * cp > 1 and ep * etp == 1)]
