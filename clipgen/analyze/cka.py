"""Representational similarity (protocol §7): linear and RBF CKA with the unbiased HSIC estimator (Song et al. 2012),
in float64, on per-class mean activations of each layer, for every pair of domains and each class subset.

CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); rows of X and Y are the same classes (in the same order)
seen in two domains, so the CKA says how alike the two domains' class geometries are at a layer.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

KERNELS = ("linear", "rbf")


def gram_linear(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def gram_rbf(x: np.ndarray) -> np.ndarray:
    """exp(-d^2 / (2 sigma^2)) with sigma = the median Euclidean distance between distinct rows (so the kernel
    scales with the data; a constant bandwidth would make CKA depend on the activations' scale)."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    off = d2[~np.eye(len(x), dtype=bool)]
    sigma2 = float(np.median(np.sqrt(off))) ** 2 if off.size else 0.0
    if sigma2 <= 0.0:  # all rows identical: every pair equally similar
        return np.ones_like(d2)
    return np.exp(-d2 / (2.0 * sigma2))


def gram(x: np.ndarray, kernel: str) -> np.ndarray:
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x)
    raise ValueError(f"unknown CKA kernel {kernel!r}: expected one of {KERNELS}")


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC estimator of Song et al. (2012), eq. 5; needs n >= 4."""
    k = np.array(k, dtype=np.float64)
    l = np.array(l, dtype=np.float64)
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones = np.ones(n)
    kl = k @ l
    term1 = np.trace(kl)
    term2 = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ kl @ ones)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def cka(x: np.ndarray, y: np.ndarray, kernel: str = "linear") -> float:
    """CKA between representations ``x [n, p]`` and ``y [n, q]`` of the same n items; NaN when undefined (fewer
    than 4 items, or a representation with no variation)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same items in both representations, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 4:
        return float("nan")
    k, l = gram(x, kernel), gram(y, kernel)
    kk, ll = hsic_unbiased(k, k), hsic_unbiased(l, l)
    if not (kk > 0 and ll > 0):
        return float("nan")
    return float(hsic_unbiased(k, l) / math.sqrt(kk * ll))


def group_means(acts: np.ndarray, domains: np.ndarray, labels: np.ndarray, domain_list: Sequence[str],
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean activation per (domain, class): ``means [D, C, channels]`` (float64) and ``present [D, C]``."""
    acts = np.asarray(acts, np.float64)
    means = np.zeros((len(domain_list), num_classes, acts.shape[1]))
    present = np.zeros((len(domain_list), num_classes), dtype=bool)
    for di, d in enumerate(domain_list):
        for c in range(num_classes):
            m = (domains == d) & (labels == c)
            if m.any():
                means[di, c] = acts[m].mean(axis=0)
                present[di, c] = True
    return means, present


def cka_matrix(means: np.ndarray, present: np.ndarray, class_idx: Sequence[int], kernel: str) -> np.ndarray:
    """``[D, D]`` CKA between domains over the classes ``class_idx`` (those present in both domains of a pair).
    The class list is an argument of every call, never carried over from another subset."""
    n_dom = means.shape[0]
    out = np.full((n_dom, n_dom), np.nan)
    class_idx = np.asarray(class_idx, dtype=np.int64)
    for a in range(n_dom):
        for b in range(a, n_dom):
            keep = class_idx[present[a, class_idx] & present[b, class_idx]]
            out[a, b] = out[b, a] = cka(means[a, keep], means[b, keep], kernel)
    return out


def cka_floor(means: np.ndarray, present: np.ndarray, class_idx: Sequence[int], kernel: str,
              a: int, b: int) -> list[float]:
    """CKA between domains a and b with the classes MISMATCHED: for every cyclic shift s = 1..n-1 of the n
    classes present in both, class i of a is paired with class i + s of b. Every class keeps its own mean, so only
    the class correspondence is broken: the values are what CKA gives when the two domains' class geometries
    share nothing class-specific (with few classes the unbiased estimator scatters around 0, negative values
    included; this spread is the noise floor the same-class value is read against)."""
    class_idx = np.asarray(class_idx, dtype=np.int64)
    keep = class_idx[present[a, class_idx] & present[b, class_idx]]
    return [cka(means[a, keep], means[b, np.roll(keep, s)], kernel) for s in range(1, len(keep))]


def cka_by_layer(acts: dict[str, np.ndarray], domains: np.ndarray, labels: np.ndarray,
                 domain_list: Sequence[str], subsets: dict[str, Sequence[int]], num_classes: int,
                 kernels: Sequence[str] = KERNELS, floor_row: int | None = None) -> tuple[dict, dict]:
    """``({kernel: {subset: {layer: [D, D] list}}}, floors)`` for every layer of ``acts``; ``floors`` has the
    same nesting with ``{domain: [CKA per class shift]}`` (:func:`cka_floor`) of domain ``floor_row`` (the test
    domain) against every other domain, or is empty when ``floor_row`` is None."""
    res: dict = {k: {s: {} for s in subsets} for k in kernels}
    floors: dict = {k: {s: {} for s in subsets} for k in kernels} if floor_row is not None else {}
    for layer, a in acts.items():
        means, present = group_means(a, domains, labels, domain_list, num_classes)
        for kernel in kernels:
            for subset, idx in subsets.items():
                res[kernel][subset][layer] = _json_matrix(cka_matrix(means, present, idx, kernel))
                if floor_row is not None:
                    floors[kernel][subset][layer] = {
                        domain_list[o]: [None if not np.isfinite(v) else round(float(v), 6)
                                         for v in cka_floor(means, present, idx, kernel, floor_row, o)]
                        for o in range(len(domain_list)) if o != floor_row}
    return res, floors


def _json_matrix(m: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in m]
