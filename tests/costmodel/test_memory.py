"""Memory formulas against the ZeRO paper and Korthikanti et al. 2022."""

import pytest

from autoplan.costmodel.memory import layer_activation_bytes, model_state_bytes

S, B, H, A = 512, 1, 1024, 16            # the traced GPT layer of the gpt_eager_profile fixture
SBH = S * B * H
SCORES = 5 * A * S * S * B                # 5as²b: softmax out (2), dropout mask (1), dropout out (2)
LN_STATS = 2 * 2 * 4 * S * B              # two LayerNorms x (mean, rstd) x fp32 per token: not in the paper


@pytest.mark.parametrize("stage, expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_model_states_match_paper_figure_1(stage, expected_gb):
    """Oracle: Rajbhandari et al. 2020 (ZeRO), Fig. 1: Ψ = 7.5B, N_d = 64, K = 12.
    stage 0: (2+2+12)·7.5e9 = 120 GB; 1: 2Ψ+2Ψ+12Ψ/64 = 31.4 GB; 2: 2Ψ+14Ψ/64 = 16.6 GB; 3: 16Ψ/64 = 1.9 GB."""
    total = sum(model_state_bytes(params=7.5e9, zero_stage=stage, shard_degree=64))
    assert total / 1e9 == pytest.approx(expected_gb, abs=0.05)


def test_zero_with_one_rank_shards_nothing():
    """Limit case: N_d = 1 -> every stage keeps the full 16 bytes per parameter."""
    for stage in range(4):
        assert sum(model_state_bytes(params=1e9, zero_stage=stage, shard_degree=1)) == 16e9


def _block(profile):
    return [layer for layer in profile.layers if layer.block == 0]


def _block_activation(profile, **kw):
    layers = _block(profile)
    return sum(layer_activation_bytes(layer=layer, micro_batch_size=B, cp=1, block_first=i == 0, **kw)
               for i, layer in enumerate(layers))


def test_korthikanti_no_parallelism(gpt_eager_profile):
    """Oracle: Korthikanti et al. 2022, eq. 1: sbh(34 + 5as/h) bytes per layer (+ LayerNorm statistics)."""
    got = _block_activation(gpt_eager_profile, tp=1, sequence_parallel=False, recompute="none")
    assert got == 34 * SBH + SCORES + LN_STATS


@pytest.mark.parametrize("t", [2, 4, 8])
def test_korthikanti_tensor_parallel(gpt_eager_profile, t):
    """Oracle: Korthikanti et al. 2022, eq. 2: sbh(10 + 24/t + 5as/(ht)); the replicated 10sbh part
    also holds the LayerNorm statistics."""
    got = _block_activation(gpt_eager_profile, tp=t, sequence_parallel=False, recompute="none")
    assert got == pytest.approx(10 * SBH + (24 * SBH + SCORES) / t + LN_STATS)


@pytest.mark.parametrize("t", [2, 8])
def test_korthikanti_tensor_and_sequence_parallel(gpt_eager_profile, t):
    """Oracle: Korthikanti et al. 2022, eq. 4: sbh(34/t + 5as/(ht)) (statistics split by SP too)."""
    got = _block_activation(gpt_eager_profile, tp=t, sequence_parallel=True, recompute="none")
    assert got == pytest.approx((34 * SBH + SCORES + LN_STATS) / t)


@pytest.mark.parametrize("t, sp", [(1, False), (8, False), (8, True)])
def test_korthikanti_selective_recompute(gpt_eager_profile, t, sp):
    """Oracle: Korthikanti et al. 2022, Sec. 4.3 / Table 2: selective recompute drops the 5as²b term:
    sbh(10 + 24/t) with TP; sbh·34/t with TP+SP."""
    got = _block_activation(gpt_eager_profile, tp=t, sequence_parallel=sp, recompute="selective")
    expected = (34 * SBH + LN_STATS) / t if sp else 10 * SBH + 24 * SBH / t + LN_STATS
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("t, sp", [(1, False), (8, True)])
def test_korthikanti_full_recompute_keeps_the_block_input(gpt_eager_profile, t, sp):
    """Oracle: Korthikanti et al. 2022, Table 2: full recomputation keeps 2sbh per layer (/t with SP)."""
    got = _block_activation(gpt_eager_profile, tp=t, sequence_parallel=sp, recompute="full")
    assert got == pytest.approx(2 * SBH / (t if sp else 1))


def test_context_parallel_splits_activations(gpt_eager_profile):
    """CP splits the sequence: each rank keeps 1/cp of every activation (Liu et al. 2023)."""
    layer = _block(gpt_eager_profile)[1]
    one = layer_activation_bytes(layer=layer, tp=1, sequence_parallel=False, cp=1, recompute="none",
                                 micro_batch_size=2, block_first=False)
    four = layer_activation_bytes(layer=layer, tp=1, sequence_parallel=False, cp=4, recompute="none",
                                  micro_batch_size=2, block_first=False)
    assert four == pytest.approx(one / 4)
