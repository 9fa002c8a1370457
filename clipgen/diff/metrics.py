"""The paper's metrics for one hypothesis, and the tests the slice-diff generator uses; pure numpy/scipy.

The verifier labels every image N/A, A or B (verify.py). For a hypothesis that predicts side P (other side O)
on a split with N images of which ``n_slice`` fall in its slice:

- frequency  f = (n_A + n_B) / N                       how much of the evaluation set the difference touches
- accuracy     = n_P / (n_A + n_B)                      (NaN when no image is labelled A or B)
- margin       = (n_P - n_O) / n_slice                  the predicted side's share of the slice minus the other's
- accepted    <=> margin > alpha (alpha = 0.01 by default); the headline decision is on the held-out
                 verification split, since every generated hypothesis was selected for its discovery margin
- acceptance rate = accepted / all hypotheses of a generator.

Shares are taken over the slice's images (the images the hypothesis speaks about), so a difference confined
to a small slice of a large evaluation set can be accepted; how broad it is shows in the frequency.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def frequency(n_a: int, n_b: int, n_total: int) -> float:
    return (n_a + n_b) / n_total if n_total > 0 else float("nan")


def accuracy(n_a: int, n_b: int, direction: str) -> float:
    n = n_a + n_b
    if n == 0:
        return float("nan")
    return (n_b if direction == "B" else n_a) / n


def margin(n_a: int, n_b: int, n_slice: int, direction: str) -> float:
    if n_slice <= 0:
        return 0.0
    return ((n_b - n_a) if direction == "B" else (n_a - n_b)) / n_slice


def accepted(n_a: int, n_b: int, n_slice: int, direction: str, alpha: float) -> bool:
    """The alpha-margin rule: the predicted side's share of the slice exceeds the other's by more than alpha."""
    return margin(n_a, n_b, n_slice, direction) > alpha


def acceptance_rate(flags) -> float:
    flags = list(flags)
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


def split_metrics(n_a: int, n_b: int, n_slice: int, n_total: int, direction: str, alpha: float) -> dict:
    return {"n_a": int(n_a), "n_b": int(n_b), "n_slice": int(n_slice), "n": int(n_total),
            "frequency": frequency(n_a, n_b, n_total), "accuracy": accuracy(n_a, n_b, direction),
            "margin": margin(n_a, n_b, n_slice, direction),
            "accepted": accepted(n_a, n_b, n_slice, direction, alpha)}


def mcnemar_exact(n_a, n_b) -> np.ndarray:
    """Two-sided exact McNemar p-values (binomial test of n_b out of n_a + n_b at 1/2), vectorised."""
    n_a = np.asarray(n_a, dtype=np.int64)
    n_b = np.asarray(n_b, dtype=np.int64)
    n = n_a + n_b
    k = np.minimum(n_a, n_b)
    p = 2.0 * stats.binom.cdf(k, n, 0.5)
    return np.where(n > 0, np.minimum(p, 1.0), 1.0)


def benjamini_hochberg(p) -> np.ndarray:
    """BH-adjusted q-values (reject at level q where q-value <= q)."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(ranked, 1.0)
    return q


def mcnemar_z(n_a, n_b) -> np.ndarray:
    """Signed McNemar statistic (n_b - n_a) / sqrt(n_a + n_b); 0 where no image is discordant."""
    n_a = np.asarray(n_a, dtype=np.float64)
    n_b = np.asarray(n_b, dtype=np.float64)
    n = n_a + n_b
    return np.where(n > 0, (n_b - n_a) / np.sqrt(np.maximum(n, 1.0)), 0.0)


def differs_from_rest(n_a, n_b, n, pn_a, pn_b, pn) -> np.ndarray:
    """Two-sided p-value that a child slice's mean signed verdict (+1 B, -1 A, 0 alike) differs from that of
    the rest of its parent (parent minus child); a normal test on per-image scores. 1.0 where the rest is
    empty (the child is the parent)."""
    n_a, n_b, n = (np.asarray(x, dtype=np.float64) for x in (n_a, n_b, n))
    r_a, r_b, r = (np.asarray(pn_a, dtype=np.float64) - n_a, np.asarray(pn_b, dtype=np.float64) - n_b,
                   np.asarray(pn, dtype=np.float64) - n)
    ok = (n > 0) & (r > 0)
    nn, rr = np.maximum(n, 1.0), np.maximum(r, 1.0)
    m_c, m_r = (n_b - n_a) / nn, (r_b - r_a) / rr
    v_c = (n_a + n_b) / nn - m_c ** 2
    v_r = (r_a + r_b) / rr - m_r ** 2
    se = np.sqrt(v_c / nn + v_r / rr)
    z = np.where(se > 0, np.abs(m_c - m_r) / np.where(se > 0, se, 1.0), np.where(m_c != m_r, math.inf, 0.0))
    p = 2.0 * stats.norm.sf(z)
    return np.where(ok, p, 1.0)
