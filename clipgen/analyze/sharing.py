"""SAE feature sharing between domains (protocol §7, Alg. 1/2 of the paper) and concept naming of SAE features.

Alg. 1 (histograms): for class c and domain d, H[c, d, f] counts the images of (c, d) whose top-``top_active``
active SAE features include f.
Alg. 2 (sharing): share_c(a, b) = mean over k in ks of |topk(H[c, a]) ∩ topk(H[c, b])| / k, where topk are the k
most frequent features (ties: lower feature index first; only features that occur at all). Averaged over
classes (those with images in both domains) this gives a domains x domains matrix S; the score of domain d is
the mean of row d off the diagonal. Every row is computed by :func:`domain_scores`, and the score of the test
domain is looked up by its own index, never a loop variable left over from another domain. The floor: the same
with different classes paired (c != c').
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

KS = (5, 10, 15, 20)


def top_active(codes: np.ndarray, k: int) -> list[np.ndarray]:
    """Per row, the indices of its (at most) k largest strictly positive entries."""
    out = []
    for row in np.asarray(codes):
        order = np.argsort(-row, kind="stable")[:k]
        out.append(order[row[order] > 0])
    return out


def histograms(codes: np.ndarray, domains: np.ndarray, labels: np.ndarray, domain_list: Sequence[str],
               class_idx: Sequence[int], top_k_active: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Alg. 1: ``H [len(class_idx), len(domain_list), features]`` (counts) and the image counts ``[C, D]``."""
    codes = np.asarray(codes)
    tops = top_active(codes, top_k_active)
    hist = np.zeros((len(class_idx), len(domain_list), codes.shape[1]), dtype=np.int64)
    counts = np.zeros((len(class_idx), len(domain_list)), dtype=np.int64)
    dom_index = {d: i for i, d in enumerate(domain_list)}
    cls_index = {int(c): i for i, c in enumerate(class_idx)}
    for t, d, y in zip(tops, domains, labels):
        ci, di = cls_index.get(int(y)), dom_index.get(str(d))
        if ci is None or di is None:
            continue
        hist[ci, di, t] += 1
        counts[ci, di] += 1
    return hist, counts


def topk_features(h: np.ndarray, k: int) -> set[int]:
    order = np.argsort(-h, kind="stable")[:k]
    return {int(f) for f in order if h[f] > 0}


def share(h_a: np.ndarray, h_b: np.ndarray, ks: Sequence[int] = KS) -> float:
    """Alg. 2 for one class and one pair of domains."""
    return float(np.mean([len(topk_features(h_a, k) & topk_features(h_b, k)) / k for k in ks]))


def share_matrix(hist: np.ndarray, counts: np.ndarray, ks: Sequence[int] = KS,
                 mismatched: bool = False) -> np.ndarray:
    """``[D, D]``: per pair of domains the mean over classes (with images in both) of :func:`share`; NaN where no
    class has images in both. ``mismatched=True`` gives the floor instead: the mean over every ordered pair of
    DIFFERENT classes c != c' of share(H[c, a], H[c', b]), i.e. how many top features two domains share when
    the class is not shared (features common to everything, such as a domain's style, score here too)."""
    n_cls, n_dom, _ = hist.shape
    tops = [[[topk_features(hist[c, d], k) for k in ks] for d in range(n_dom)] for c in range(n_cls)]
    out = np.full((n_dom, n_dom), np.nan)
    pairs = [(c, e) for c in range(n_cls) for e in range(n_cls) if (c != e) == mismatched]
    for a in range(n_dom):
        for b in range(n_dom):
            vals = [np.mean([len(ta & tb) / k for ta, tb, k in zip(tops[c][a], tops[e][b], ks)])
                    for c, e in pairs if counts[c, a] and counts[e, b]]
            if vals:
                out[a, b] = float(np.mean(vals))
    return out


def domain_scores(matrix: np.ndarray, domain_list: Sequence[str]) -> dict[str, float | None]:
    """The feature-sharing score of every domain: mean of its row without the diagonal (ignoring NaN)."""
    out = {}
    for i, d in enumerate(domain_list):
        row = np.delete(np.asarray(matrix[i], np.float64), i)
        row = row[np.isfinite(row)]
        out[d] = float(row.mean()) if row.size else None
    return out


def concept_names(decoder: np.ndarray, text_emb: np.ndarray, vocab: Sequence[str],
                  features: Sequence[int]) -> dict[int, dict]:
    """Name SAE features: argmax cosine between a decoder column (``decoder [dim, features]``) and the text
    embeddings of a vocabulary (``text_emb [len(vocab), dim]``)."""
    dec = np.asarray(decoder, np.float64)
    txt = np.asarray(text_emb, np.float64)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
    out = {}
    for f in features:
        col = dec[:, int(f)]
        col = col / max(np.linalg.norm(col), 1e-12)
        sims = txt @ col
        best = int(np.argmax(sims))
        out[int(f)] = {"concept": vocab[best], "cosine": round(float(sims[best]), 4)}
    return out


def read_vocab(path) -> list[str]:
    """A concept vocabulary file: one concept per line; blank lines and lines starting with '#' are skipped."""
    from pathlib import Path

    from clipgen.errors import ClipgenError

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ClipgenError(f"analysis.sae_vocab_file={str(path)!r} does not exist: expected a text file with one "
                           "concept per line")
    words = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise ClipgenError(f"analysis.sae_vocab_file={str(path)!r} holds no concepts: expected one concept per "
                           "line")
    return words
