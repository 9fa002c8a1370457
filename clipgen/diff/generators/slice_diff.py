"""Generator 1, slice diff: every slice x behaviour, scored on the discovery split by an exact McNemar test.

Slices are enumerated as group-bys over attribute tuples (``SLICE_TYPES``), so one ``np.bincount`` per tuple and
behaviour counts A- and B-verdicts for every slice at once. A candidate survives when

1. its slice has at least ``min_slice`` discovery images and it is the first slice type that yields this set of
   images (identical sets are described once, by the simplest description);
2. its Benjamini-Hochberg q-value over all tested candidates is <= ``fdr_q``;
3. for every parent slice (one condition fewer) its mean signed verdict differs from the rest of the parent
   (two-sided p <= ``fdr_q``): a child that only inherits its parent's difference adds nothing;
4. no surviving sub-slice (any finer slice with the same behaviour and direction) explains it: when the rest of
   the slice outside a surviving sub-slice shows no significant difference, the sub-slice is the better
   description and the broader one is dropped.

Candidates are ranked by the signed McNemar statistic in the majority direction; at most ``max_hypotheses``
are returned.
"""
from __future__ import annotations

import numpy as np

from clipgen.diff.metrics import benjamini_hochberg, differs_from_rest, mcnemar_exact, mcnemar_z
from clipgen.diff.predicates import BehaviourParams, Codes, behaviour_side

# Attribute tuples in order of preference (simplest description first).
SLICE_TYPES: tuple[tuple[str, ...], ...] = (
    (), ("domain",), ("class",), ("domain_seen",), ("combo",), ("domain", "combo"), ("domain_seen", "combo"),
    ("domain", "class"), ("class", "combo"))
SIMPLE_BEHAVIOURS = ("correct", "true_prob", "confident_error", "shortcut_error")


class GroupIndex:
    """Group ids of every slice type over the records."""

    def __init__(self, codes: Codes, types=SLICE_TYPES):
        self.codes = codes
        exposure = codes.recs.has_exposure
        self.types = [t for t in types if exposure or not ({"combo", "domain_seen"} & set(t))]
        self.card = {a: len(v) for a, v in codes.names.items()}
        self.gid, self.size = {}, {}
        for t in self.types:
            dims = tuple(self.card[a] for a in t)
            self.size[t] = int(np.prod(dims)) if t else 1
            self.gid[t] = (np.ravel_multi_index(tuple(codes.arrays[a] for a in t), dims) if t
                           else np.zeros(codes.recs.n, dtype=np.int64))

    def slice_of(self, t: tuple, g: int) -> dict:
        if not t:
            return {}
        vals = np.unravel_index(g, tuple(self.card[a] for a in t))
        return {a: self.codes.names[a][int(v)] for a, v in zip(t, vals)}

    def parent_group(self, t: tuple, g: int, drop: str) -> tuple[tuple, int]:
        vals = dict(zip(t, np.unravel_index(g, tuple(self.card[a] for a in t)))) if t else {}
        pt = tuple(a for a in t if a != drop)
        if not pt:
            return pt, 0
        return pt, int(np.ravel_multi_index(tuple(int(vals[a]) for a in pt), tuple(self.card[a] for a in pt)))

    def signatures(self, seed: int) -> dict:
        """A random-weight sum per group: equal sums (and sizes) mean the same set of images."""
        w = np.random.default_rng(seed).random(self.codes.recs.n)
        return {t: (np.bincount(self.gid[t], weights=w, minlength=self.size[t]).round(9),
                    np.bincount(self.gid[t], minlength=self.size[t])) for t in self.types}


def _counts(gid: np.ndarray, size: int, disc: np.ndarray, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = gid[disc]
    s = side[disc]
    return (np.bincount(g, weights=(s == -1), minlength=size), np.bincount(g, weights=(s == 1), minlength=size))


def _explained_parents(ix: GroupIndex, rows: list, kept: list[int], fdr_q: float) -> set[int]:
    """Kept candidates whose difference a kept sub-slice explains: same behaviour, target and direction, and the
    rest of the parent (parent minus sub-slice) shows no significant difference (exact McNemar p > fdr_q)."""
    key_of = {}
    for i in kept:
        ti, g, beh, k, a, b, _ = rows[i]
        key_of[(ix.types[ti], g, beh, k, b > a)] = i
    explained: set[int] = set()
    for i in kept:
        ti, g, beh, k, a, b, _ = rows[i]
        t = ix.types[ti]
        idx = np.flatnonzero(ix.gid[t] == g)
        for t2 in ix.types:
            if t2 == t:
                continue
            vals = np.unique(ix.gid[t2][idx])
            if len(vals) != 1:
                continue  # not a superset of this slice
            j = key_of.get((t2, int(vals[0]), beh, k, b > a))
            if j is None or j == i:
                continue
            _, _, _, _, pa, pb, pn = rows[j]
            if pn <= rows[i][6]:
                continue  # the same set of images
            if mcnemar_exact(pa - a, pb - b) > fdr_q:
                explained.add(j)
    return explained


def _unique_slices(ix: GroupIndex, sig: dict, n_disc: dict, min_slice: int) -> dict:
    """Step 1: per slice type, the groups kept as candidates: at least ``min_slice`` discovery images, and the
    first type (simplest description) that yields their set of images."""
    seen: set = set()
    keep = {}
    for t in ix.types:
        ok = np.zeros(ix.size[t], dtype=bool)
        s_w, s_n = sig[t]
        for g in np.flatnonzero((n_disc[t] >= min_slice) & (s_n > 0)):
            key = (s_w[g], s_n[g])
            if key not in seen:
                seen.add(key)
                ok[g] = True
        keep[t] = ok
    return keep


def _verdict_counts(ix: GroupIndex, disc: np.ndarray, params: BehaviourParams) -> tuple[dict, list]:
    """Step 2: counts of A / B verdicts per slice and behaviour on discovery (confusions: per slice x target
    class, also for the parents of the slice types with a class, which the child-vs-parent test needs); and the
    slice types whose candidates include confusions."""
    recs = ix.codes.recs
    counts = {}
    for beh in SIMPLE_BEHAVIOURS:
        side = behaviour_side(recs, beh, None, params)
        for t in ix.types:
            counts[(t, beh)] = _counts(ix.gid[t], ix.size[t], disc, side)
    C = len(recs.classes)
    wrong_b = disc & (recs.pred_b != recs.label) & (recs.pred_a != recs.pred_b)
    wrong_a = disc & (recs.pred_a != recs.label) & (recs.pred_a != recs.pred_b)
    conf_types = [t for t in ix.types if "class" in t]
    parent_conf = {pt for t in conf_types for pt in [tuple(a for a in t if a != d) for d in t]}
    for t in set(conf_types) | parent_conf:
        if t not in ix.gid:
            continue
        g = ix.gid[t]
        na = np.bincount(g[wrong_a] * C + recs.pred_a[wrong_a], minlength=ix.size[t] * C).reshape(ix.size[t], C)
        nb = np.bincount(g[wrong_b] * C + recs.pred_b[wrong_b], minlength=ix.size[t] * C).reshape(ix.size[t], C)
        counts[(t, "confusion")] = (na, nb)
    return counts, conf_types


def generate(codes: Codes, verify_mask: np.ndarray, params: BehaviourParams, *, fdr_q: float = 0.05,
             min_slice: int = 10, max_hypotheses: int = 50, seed: int = 0,
             index: GroupIndex | None = None) -> list[dict]:
    recs = codes.recs
    ix = index or GroupIndex(codes)
    disc = ~verify_mask
    sig = ix.signatures(seed)
    n_disc = {t: np.bincount(ix.gid[t][disc], minlength=ix.size[t]) for t in ix.types}

    keep = _unique_slices(ix, sig, n_disc, min_slice)  # 1.
    counts, conf_types = _verdict_counts(ix, disc, params)  # 2.

    # 3. candidate table
    rows = []  # (type index, group, behaviour, target, n_a, n_b, n_slice)
    for ti, t in enumerate(ix.types):
        groups = np.flatnonzero(keep[t])
        if len(groups) == 0:
            continue
        for beh in SIMPLE_BEHAVIOURS:
            na, nb = counts[(t, beh)]
            for g in groups[(na[groups] + nb[groups]) > 0]:
                rows.append((ti, int(g), beh, -1, int(na[g]), int(nb[g]), int(n_disc[t][g])))
        if t in conf_types:
            na, nb = counts[(t, "confusion")]
            sub_a, sub_b = na[groups], nb[groups]
            gi, ki = np.nonzero((sub_a + sub_b) > 0)
            for g, k in zip(groups[gi].tolist(), ki.tolist()):
                rows.append((ti, g, "confusion", k, int(na[g, k]), int(nb[g, k]), int(n_disc[t][g])))
    if not rows:
        return []
    n_a = np.array([r[4] for r in rows])
    n_b = np.array([r[5] for r in rows])
    p = mcnemar_exact(n_a, n_b)
    q = benjamini_hochberg(p)
    z = mcnemar_z(n_a, n_b)

    kept = []
    for i in np.flatnonzero((q <= fdr_q) & (n_a != n_b)):
        ti, g, beh, k, a, b, n = rows[i]
        t = ix.types[ti]
        differs = True
        for drop in t:
            pt, pg = ix.parent_group(t, g, drop)
            if pt not in ix.gid:
                continue
            pa, pb = counts[(pt, beh)]
            if beh == "confusion":
                pa_, pb_ = pa[pg, k], pb[pg, k]
            else:
                pa_, pb_ = pa[pg], pb[pg]
            if differs_from_rest(a, b, n, pa_, pb_, n_disc[pt][pg]) > fdr_q:
                differs = False
                break
        if not differs:
            continue
        kept.append(i)
    explained = _explained_parents(ix, rows, kept, fdr_q)
    out = []
    for i in kept:
        if i in explained:
            continue
        ti, g, beh, k, a, b, n = rows[i]
        out.append({"generator": "slice_diff", "slice": ix.slice_of(ix.types[ti], g), "behaviour": beh,
                    "target": recs.classes[k] if k >= 0 else None, "direction": "B" if b > a else "A",
                    "p_value": float(p[i]), "q_value": float(q[i]), "z": float(abs(z[i]))})
    out.sort(key=lambda h: (-h["z"], h["p_value"], str(h["slice"]), h["behaviour"], str(h["target"])))
    return out[:max_hypotheses]
