"""The expert defaults a search result is compared with, each in its best fitting variant:

- pure DP: every GPU a data-parallel replica (PyTorch DDP), no sharding;
- ZeRO-3 / FSDP: every GPU a replica, parameters, gradients and optimizer states sharded;
- Megatron: TP = the largest degree up to a node (8) that divides the heads, then the fewest pipeline
  stages across nodes that fit, the rest DP (a MoE model: experts folded over the tp x dp ranks of a node,
  EP up to 8, as Megatron-LM's MoE recipes do); sequence parallelism, the distributed optimizer (ZeRO-1),
  selective recomputation (full if that does not fit), 1F1B, micro-batch 1 (Narayanan et al. 2021, Sec. 3.3:
  "tensor parallelism up to the GPUs in a node, then pipeline parallelism across nodes").
The knobs the folklore leaves open (micro-batch size, recomputation) are set to their fastest fitting value.
"""

from __future__ import annotations

from autoplan.costmodel.estimate import Coster
from autoplan.errors import InvalidPlanError
from autoplan.planner.space import RECOMPUTE, divisors
from autoplan.schema import Estimate, Plan, check_plan


def _fastest_fitting(coster: Coster, plans: list[Plan]) -> tuple[Plan, Estimate] | None:
    best = None
    for plan in plans:
        try:
            check_plan(coster.profile, coster.cluster, plan)
        except InvalidPlanError:
            continue
        est = coster.estimate(plan, check=False)
        if est.fits and (best is None or est.step_time_s < best[1].step_time_s):
            best = (plan, est)
    return best


def _data_parallel(coster: Coster, gbs: int, zero: int) -> tuple[Plan, Estimate] | None:
    gpus = coster.cluster.num_gpus
    if gbs % gpus:
        return None
    plans = [Plan(dp=gpus, zero_stage=zero, recompute=r, micro_batch_size=b, global_batch_size=gbs)
             for b in divisors(gbs // gpus) if b <= 16 for r in RECOMPUTE]
    return _fastest_fitting(coster, plans)


def _megatron(coster: Coster, gbs: int) -> tuple[Plan, Estimate] | None:
    profile, cluster = coster.profile, coster.cluster
    gpus = cluster.num_gpus
    heads = [h for h in (profile.num_heads, profile.num_kv_heads) if h]
    tp = max(t for t in divisors(gpus) if t <= min(8, cluster.gpus_per_node) and all(h % t == 0 for h in heads))
    for pp in divisors(gpus // tp):
        dp = gpus // (tp * pp)
        if pp > profile.num_blocks or gbs % dp:
            continue
        ep = _megatron_ep(profile.num_experts, dp * tp, cluster.gpus_per_node)
        for recompute in ("selective", "full"):
            found = _fastest_fitting(coster, [Plan(dp=dp, tp=tp, pp=pp, ep=ep, zero_stage=1, recompute=recompute,
                                                   sequence_parallel=tp > 1, micro_batch_size=1,
                                                   global_batch_size=gbs, schedule="1f1b")])
            if found:
                return found
    return None


def _megatron_ep(experts: int, folded: int, gpus_per_node: int) -> int:
    """Megatron-LM's MoE recipes fold expert parallelism over the tp x dp ranks of a node (parallel folding):
    the largest ep up to a node that divides the experts and those ranks; 1 for a dense model."""
    return max((e for e in divisors(folded) if e <= gpus_per_node and experts % e == 0), default=1) if experts else 1


def expert_defaults(coster: Coster, global_batch_size: int) -> dict[str, tuple[Plan, Estimate] | None]:
    """Each expert default's fastest fitting plan, or None where it has none."""
    return {
        "pure DP": _data_parallel(coster, global_batch_size, zero=0),
        "ZeRO-3/FSDP": _data_parallel(coster, global_batch_size, zero=3),
        "Megatron TP+PP": _megatron(coster, global_batch_size),
    }
