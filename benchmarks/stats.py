"""The statistics a method comparison may claim: paired tests over seeds and rank correlations across runs.

Seeds pair the runs of two methods (the same seed gives both the same data order, see benchmarks.accuracy), so the
comparison is on the per-seed differences: a paired t-test (mean difference, its 95% interval, p) and the exact
Wilcoxon signed-rank test (no normality assumed; with n pairs its smallest two-sided p is 2 / 2^n, 0.0625 at n = 5,
so it cannot reach 0.05 below 6 seeds). Spearman's rho says whether one measurement orders runs like another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired comparison of a and b (a[i] and b[i] from the same seed): differences a - b, their mean, 95% t
    interval, t, the two-sided p of the paired t-test and of the exact Wilcoxon signed-rank test. Values that
    need 2 pairs (or a non-zero spread, for t) are None."""
    from scipy import stats  # noqa: PLC0415

    if len(a) != len(b):
        raise ValueError(f"{len(a)} values against {len(b)}: a paired test needs pairs")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    out = {"n": n, "mean_difference": sum(d) / n if n else None, "sd_difference": None, "ci95": None, "t": None,
           "p_t": None, "p_wilcoxon": None}
    if n < 2:
        return out
    mean = out["mean_difference"]
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    out["sd_difference"] = sd
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    out["ci95"] = [mean - half, mean + half]
    if sd > 0:
        out["t"] = mean / (sd / math.sqrt(n))
        out["p_t"] = float(2 * stats.t.sf(abs(out["t"]), n - 1))
    if any(x != 0 for x in d):
        out["p_wilcoxon"] = float(stats.wilcoxon(d, alternative="two-sided", method="exact",
                                                 zero_method="wilcox").pvalue)
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman's rank correlation of paired measurements (ties get mean ranks) with its two-sided p (t
    approximation) and n; rho and p are None below 3 pairs or when either side is constant."""
    from scipy import stats  # noqa: PLC0415

    n = len(x)
    if n != len(y):
        raise ValueError(f"{n} values against {len(y)}")
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"n": n, "rho": None, "p": None}
    result = stats.spearmanr(x, y)
    return {"n": n, "rho": float(result.statistic), "p": float(result.pvalue)}
