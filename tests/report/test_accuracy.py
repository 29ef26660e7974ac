"""Accuracy metrics of benchmark reports, on synthetic inputs with hand-computed answers."""

import math

import pytest

from autoplan.report.accuracy import mape, ranks, regret, spearman


def test_mape_by_hand():
    """Oracle: |110-100|/100 = 0.1 and |45-50|/50 = 0.1, mean 0.1; a perfect prediction gives 0."""
    assert mape([110, 45], [100, 50]) == pytest.approx(0.1)
    assert mape([3.0, 4.0], [3.0, 4.0]) == 0


def test_ranks_average_ties():
    """Oracle: the definition of fractional ranking: 10 is 1st, the two 20s share ranks 2 and 3 (2.5)."""
    assert ranks([20, 10, 20, 30]) == [2.5, 1, 2.5, 4]


def test_spearman_known_values():
    """Oracle: monotone agreement gives 1, reversal -1; for ranks (1,2,3,4,5) against (2,1,4,3,5),
    1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*4/120 = 0.8 (the no-ties formula)."""
    assert spearman([1, 2, 3], [10, 200, 3000]) == pytest.approx(1)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 1], [1, 2]))


def test_regret_is_picked_over_best():
    """Oracle: picked 90 tokens/s while the best measured 100: 0.9."""
    assert regret(90, [100, 90, 40]) == pytest.approx(0.9)
    assert regret(100, [100, 90]) == 1


def test_mismatched_inputs_refused():
    with pytest.raises(ValueError):
        mape([1, 2], [1])
    with pytest.raises(ValueError):
        mape([1], [0])
