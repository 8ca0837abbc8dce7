"""benchmarks.stats against values worked out by hand (and from printed tables)."""

from __future__ import annotations

import pytest

from benchmarks.stats import paired_test, spearman


def test_paired_t_and_wilcoxon_on_hand_computed_values():
    # differences 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), se sqrt(0.5), t = 3 / sqrt(0.5) = 4.2426 with 4 df;
    # t(0.975, 4) = 2.776445, so the interval is 3 -+ 1.963243; two-sided p of t = 4.2426 at 4 df = 0.013236.
    # Wilcoxon: all 5 ranks positive, the most extreme of 2^5 sign patterns on each side: p = 2/32.
    r = paired_test([11, 12, 13, 14, 15], [10, 10, 10, 10, 10])
    assert r["n"] == 5 and r["mean_difference"] == 3.0
    assert r["sd_difference"] == pytest.approx(1.5811388, rel=1e-6)
    assert r["t"] == pytest.approx(4.2426407, rel=1e-6)
    assert r["ci95"] == pytest.approx([3 - 1.963243, 3 + 1.963243], abs=1e-5)
    assert r["p_t"] == pytest.approx(0.013236, abs=2e-6)
    assert r["p_wilcoxon"] == pytest.approx(0.0625)
    # the sign says which is lower: a - b
    assert paired_test([10] * 5, [11, 12, 13, 14, 15])["mean_difference"] == -3.0


def test_paired_test_with_mixed_signs():
    # differences 0.5, -0.2, 0.3, 0.1: mean 0.175, sd 0.2986079, t = 0.175 / (0.2986079 / 2) = 1.172106 at 3 df,
    # two-sided p = 0.325766. Wilcoxon: |d| ranks 4, 2, 3, 1, W- = 2; the sign patterns with W- <= 2 are the
    # negative sets {}, {1}, {2}: 3 of 16 on each side, p = 6/16.
    r = paired_test([1.5, 0.8, 1.3, 1.1], [1.0, 1.0, 1.0, 1.0])
    assert r["mean_difference"] == pytest.approx(0.175)
    assert r["t"] == pytest.approx(1.172106, rel=1e-5)
    assert r["p_t"] == pytest.approx(0.325766, abs=1e-5)
    assert r["p_wilcoxon"] == pytest.approx(0.375)


def test_paired_test_edge_cases():
    one = paired_test([1.0], [0.5])
    assert one["n"] == 1 and one["mean_difference"] == 0.5 and one["p_t"] is None and one["ci95"] is None
    same = paired_test([1.0, 2.0], [1.0, 2.0])
    assert same["mean_difference"] == 0.0 and same["t"] is None and same["p_wilcoxon"] is None
    with pytest.raises(ValueError):
        paired_test([1.0, 2.0], [1.0])


def test_spearman_on_hand_computed_values():
    # ranks of x: 1..5; y ranks 2, 1, 4, 3, 5: sum d^2 = 4, rho = 1 - 6*4 / (5*24) = 0.8
    r = spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50])
    assert r["n"] == 5 and r["rho"] == pytest.approx(0.8)
    # t = rho sqrt(3 / (1 - rho^2)) = 2.309401 at 3 df: two-sided p = 0.104088
    assert r["p"] == pytest.approx(0.104088, abs=1e-5)
    assert spearman([1, 2, 3], [3, 2, 1])["rho"] == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2])["rho"] is None and spearman([1, 1, 1], [1, 2, 3])["rho"] is None
