"""Stable discovery / verification split (protocol §8): 2/3 discovery, 1/3 verification, stratified by domain x class.

Within each domain x class stratum, images are ordered by a sha256 of ``(seed, sample_id)`` and every third one
(ranks 2, 5, 8, ...) goes to verification, so each stratum contributes floor(n/3) verification images and the
assignment depends only on the seed and the sample ids, never on file order.
"""
from __future__ import annotations

import hashlib

import numpy as np


def _hash01(seed: int, sample_ids: np.ndarray) -> np.ndarray:
    prefix = f"{int(seed)}:".encode("utf-8")
    out = np.empty(len(sample_ids), dtype=np.uint64)
    for i, sid in enumerate(sample_ids.tolist()):
        out[i] = int.from_bytes(hashlib.sha256(prefix + str(sid).encode("utf-8")).digest()[:8], "little")
    return out


def split_mask(sample_ids: np.ndarray, strata: np.ndarray, seed: int) -> np.ndarray:
    """Boolean array, True = verification. ``strata`` is an integer stratum id per image (domain x class)."""
    n = len(sample_ids)
    if n == 0:
        return np.zeros(0, dtype=bool)
    h = _hash01(seed, sample_ids)
    order = np.lexsort((h, strata))  # by stratum, then by hash
    s_sorted = strata[order]
    starts = np.r_[0, np.flatnonzero(s_sorted[1:] != s_sorted[:-1]) + 1]
    run_id = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    rank = np.arange(n) - starts[run_id]
    verify = np.zeros(n, dtype=bool)
    verify[order] = rank % 3 == 2
    return verify
