"""Embedding geometry (protocol §7): L2 distance between domain means (and its class-conditional version),
per-dimension mean differences, and seeded UMAP plots of the test embeddings coloured by domain.

Embeddings are the L2-normalised image embeddings. umap is imported only inside :func:`umap_embed` (its first
import compiles numba code for ~15 s); the scatter is drawn by clipgen.analyze.draw from the stored coordinates.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from clipgen.procs import torch_threads


def domain_mean_distances(emb: np.ndarray, domains: np.ndarray, domain_list: Sequence[str]) -> np.ndarray:
    """``[D, D]`` L2 distance between the mean embeddings of two domains (NaN if a domain has no images)."""
    emb = np.asarray(emb, np.float64)
    means = [emb[domains == d].mean(axis=0) if np.any(domains == d) else None for d in domain_list]
    n = len(domain_list)
    out = np.full((n, n), np.nan)
    for a in range(n):
        for b in range(n):
            if means[a] is not None and means[b] is not None:
                out[a, b] = float(np.linalg.norm(means[a] - means[b]))
    return out


def class_conditional_distances(emb: np.ndarray, domains: np.ndarray, labels: np.ndarray,
                                domain_list: Sequence[str], class_idx: Sequence[int],
                                mismatched: bool = False) -> np.ndarray:
    """``[D, D]``: for each class of ``class_idx`` the L2 distance between its mean embeddings in the two domains,
    averaged over the classes with images in both; ``mismatched=True`` pairs every class with every OTHER class
    instead (the distance expected when the class is not shared: a reference for the same-class value)."""
    emb = np.asarray(emb, np.float64)
    n = len(domain_list)
    means = {}
    for c in class_idx:
        for d in domain_list:
            m = (domains == d) & (labels == c)
            if m.any():
                means[(d, c)] = emb[m].mean(axis=0)
    sums = np.zeros((n, n))
    cnt = np.zeros((n, n))
    pairs = [(c, e) for c in class_idx for e in class_idx if (c != e) == mismatched]
    for a, da in enumerate(domain_list):
        for b, db in enumerate(domain_list):
            for c, e in pairs:
                if (da, c) in means and (db, e) in means:
                    sums[a, b] += np.linalg.norm(means[(da, c)] - means[(db, e)])
                    cnt[a, b] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)


def per_dimension_differences(emb: np.ndarray, domains: np.ndarray, domain_list: Sequence[str],
                              reference: str) -> dict[str, list[float]]:
    """Per embedding dimension, mean(domain) - mean(reference), for every domain with images."""
    emb = np.asarray(emb, np.float64)
    ref = emb[domains == reference].mean(axis=0)
    return {d: [round(float(v), 6) for v in emb[domains == d].mean(axis=0) - ref] for d in domain_list
            if np.any(domains == d)}


def seeded_subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of n rows, the same for the same seed."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def umap_embed(emb: np.ndarray, seed: int, n_neighbors: int = 15) -> np.ndarray:
    import warnings

    import umap  # lazy: slow first import (numba)

    n = len(emb)
    x = np.asarray(emb, np.float32)
    k = max(2, min(n_neighbors, n - 1))
    # torch_threads: numba's OpenMP layer would otherwise leave torch on every core for the rest of the process,
    # whatever analysis.threads said (two analyses side by side then ran ~3x slower each)
    with warnings.catch_warnings(), torch_threads():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and numba chatter
        knn = cosine_neighbours(x, k) if n < UMAP_EXACT_BELOW else (None, None, None)
        reducer = umap.UMAP(n_neighbors=k, random_state=seed, metric="cosine", precomputed_knn=knn,
                            init="random" if n < 8 else "spectral")
        return reducer.fit_transform(x)


UMAP_EXACT_BELOW = 4096  # umap's own threshold: below it, it finds every point's neighbours exactly


def cosine_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows (itself first) and their cosine distances, as umap finds them for fewer than
    4,096 points: its own cosine over all pairs, sorted per row. Handing them to umap skips its parallel numba
    kernel for this, whose compilation took ~4 s of every process's first UMAP."""
    from sklearn.metrics import pairwise_distances
    from umap.distances import cosine

    dist = pairwise_distances(x, metric=cosine)
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(dist, idx, axis=1).astype(np.float32)
