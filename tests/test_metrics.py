import itertools
import math

import pytest

from r1kit.eval.metrics import cons_at_k, length_stats, pass_at_k, pass_ks
from r1kit.grading import is_equiv


@pytest.mark.parametrize("n, c", [(1, 0), (1, 1), (4, 1), (5, 2), (8, 3), (10, 10), (6, 0)])
def test_pass_at_k_matches_brute_force(n, c):
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
        assert len(subsets) == math.comb(n, k)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_cons_at_k_majority_of_equal_answers():
    # 0.5 and \frac{1}{2} are one answer, so it wins 3 to 1
    assert cons_at_k(["0.5", "\\frac{1}{2}", "7", "1/2"], [True, True, False, True], is_equiv) == 1.0
    assert cons_at_k(["7", "7", "0.5", None], [False, False, True, False], is_equiv) == 0.0


def test_cons_at_k_ties_average_the_tied_answers():
    assert cons_at_k(["1", "2", "1", "2"], [True, False, True, False], is_equiv) == 0.5
    assert cons_at_k(["1", "2", "3"], [False, False, True], is_equiv) == pytest.approx(1 / 3)
    assert cons_at_k([None, None], [False, False], is_equiv) == 0.0
    assert cons_at_k(["4", None, None], [True, False, False], is_equiv) == 1.0  # missing answers abstain


def test_length_stats_and_ks():
    assert length_stats([10, 20, 30, 40]) == {"mean": 25.0, "p50": 25.0, "p90": 37.0, "max": 40.0}
    assert pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]
