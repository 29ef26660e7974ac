"""ZeRO-1's optimizer (executor.zero_one) on 3 gloo ranks: each rank keeps an even share of the states, and
the parameters every rank ends with are AdamW's."""

import functools

import pytest
import torch

from autoplan.executor.precision import MasterWeightAdamW
from dist_worker import SHAPES, adamw_steps, run_zero_one

WORLD = 3


@pytest.fixture(scope="module")
def ranks():
    return run_zero_one(WORLD)


def _single_process(dtype: torch.dtype) -> list[torch.Tensor]:
    """Oracle: torch.optim.AdamW (fp32) or the master-weight AdamW (bf16) on one process, same gradients."""
    if dtype == torch.float32:
        make = functools.partial(torch.optim.AdamW, foreach=False)
    else:
        make = MasterWeightAdamW
    params, _ = adamw_steps(make, dtype)
    return [p.detach().float() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_rank_ends_with_adamws_parameters(ranks, dtype):
    expected = _single_process(dtype)
    for rank in range(WORLD):
        params, _ = ranks[rank][str(dtype)]
        for got, want in zip(params, expected, strict=True):
            torch.testing.assert_close(torch.tensor(got), want, rtol=1e-6, atol=1e-7)


def test_states_are_split_evenly(ranks):
    """Oracle: ZeRO P_os (Rajbhandari et al. 2020): a parameter of n elements leaves ceil(n/3) on the first
    ranks and the rest on the last, together exactly n."""
    for index, shape in enumerate(SHAPES):
        n = torch.Size(shape).numel()
        sizes = [ranks[rank][str(torch.float32)][1][index] for rank in range(WORLD)]
        assert sum(sizes) == n
        assert max(sizes) == -(-n // WORLD)


def test_buckets_hold_at_most_the_largest_tensor_and_pack_the_small_ones():
    """Oracle: by hand. Chunk lengths (3 ranks) 2, 2, 10, 1, 1, 3, 2, 6: capacity min(2^22, 3 x 10) = 30 elements;
    the 30-element tensor makes its own bucket; the others (x 3), largest first, into the first bucket with room:
    g 18, e 9 (27), a 6 opens a second, b 6 (12), f 6 (18), c 3 fills the first (30), d 3 (21). In each bucket
    the tensors keep their order."""
    from autoplan.executor.zero_one import _buckets

    names = ["a", "b", "big", "c", "d", "e", "f", "g"]
    assert _buckets(names, [2, 2, 10, 1, 1, 3, 2, 6], size=3) == [["big"], ["c", "e", "g"], ["a", "b", "d", "f"]]
    assert _buckets(["x"], [5], size=2) == [["x"]]
