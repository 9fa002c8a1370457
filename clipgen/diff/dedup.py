"""Near-duplicate hypotheses merged, so that the rows of a diff do not restate each other.

Two hypotheses with the same behaviour, confusion target and direction are near-duplicates when

- they speak about the same set of images (e.g. "sketch images of classes only B saw" and "images whose
  combination only B saw" when B's extra classes are all in sketch), or
- one's image set lies inside the other's (membership implies membership) and the two say the same thing there:
  either the rest of the larger set shows no difference of its own toward the predicted side (the smaller set
  explains it: it is the better description), or the smaller set does not differ from the rest of the larger
  one (it only inherits the larger set's difference: the larger set is the better description).

Nested hypotheses whose sets both carry their own difference stay separate: they are two findings. All tests use
the discovery split only (exact McNemar for "the rest shows a difference", the normal test of
``metrics.differs_from_rest`` for "differs from the rest", both at ``fdr_q``), so merging is part of
generation and the verification split stays untouched.

``merge`` sets ``duplicate_of`` (the id of the representative) on every merged hypothesis and ``merged`` (ids)
on representatives; it is run once per generator and once across generators (``key``/``members`` names chosen
by the caller, e.g. ``same_as`` for a cluster hypothesis that restates a slice_diff one).
"""
from __future__ import annotations

import numpy as np

from clipgen.diff.metrics import differs_from_rest, mcnemar_exact
from clipgen.diff.predicates import comparable

GENERATOR_ORDER = ("slice_diff", "cluster", "sae")  # on equal evidence the simpler, enumerated description is kept


def _preference(h: dict) -> tuple:
    gen = GENERATOR_ORDER.index(h["generator"]) if h["generator"] in GENERATOR_ORDER else len(GENERATOR_ORDER)
    return (-h["z"], gen, len(h["slice"]), h["text"])


def image_set(verifier, h: dict) -> np.ndarray:
    """The images a hypothesis speaks about: its slice, where its behaviour can differ at all."""
    return verifier.codes.mask(h["slice"]) & comparable(verifier.recs, h["behaviour"])


def _counts(verdict: np.ndarray, sel: np.ndarray) -> tuple[int, int, int]:
    v = verdict[sel]
    return int((v == -1).sum()), int((v == 1).sum()), int(sel.sum())


def relation(small: np.ndarray, big: np.ndarray, verdict: np.ndarray, disc: np.ndarray, direction: str,
             fdr_q: float) -> str | None:
    """How hypothesis ``small`` relates to ``big`` (same behaviour and direction; ``verdict`` is the per-image
    A/B verdict of that behaviour): "same" (same image set), "small_explains" (the rest of ``big`` shows no
    difference of its own toward ``direction``), "small_inherits" (``small`` does not differ from the rest of
    ``big``), or None (not nested, or two separate findings)."""
    if np.array_equal(small, big):
        return "same"
    if (small & ~big).any() or not small.any():
        return None
    rest = big & ~small & disc
    ra, rb, _ = _counts(verdict, rest)
    toward = (rb > ra) if direction == "B" else (ra > rb)
    if not (toward and float(mcnemar_exact(ra, rb)) <= fdr_q):
        return "small_explains"
    ca, cb, cn = _counts(verdict, small & disc)
    pa, pb, pn = _counts(verdict, big & disc)
    if float(differs_from_rest(ca, cb, cn, pa, pb, pn)) > fdr_q:
        return "small_inherits"
    return None


def merge(hyps: list[dict], verifier, fdr_q: float, *, key: str = "duplicate_of", members: str = "merged",
          across_generators: bool = False) -> list[dict]:
    """Merge near-duplicates among ``hyps`` (each with ``id``, ``z``, ``slice``, ``behaviour``, ``direction``);
    returns the representatives, strongest evidence first. Marks the others ``h[key] = representative id``.
    ``across_generators``: only a hypothesis of another generator can be merged into a representative."""
    disc = ~verifier.verify_mask
    reps: list[dict] = []
    sets: dict[int, np.ndarray] = {}
    for h in sorted(hyps, key=_preference):
        h.setdefault(key, None)
        h.setdefault(members, [])
        m = image_set(verifier, h)
        sets[h["id"]] = m
        bkey = (h["behaviour"], h.get("target"), h["direction"])
        verdict = verifier.side(h["behaviour"], h.get("target"))
        into, swap = None, False
        for r in reps:
            if (r["behaviour"], r.get("target"), r["direction"]) != bkey:
                continue
            if across_generators and r["generator"] == h["generator"]:
                continue
            rm = sets[r["id"]]
            if h["slice"] == r["slice"]:
                into = r
                break
            rel = relation(m, rm, verdict, disc, h["direction"], fdr_q)  # h inside r?
            if rel is not None:
                # h is the better description when it explains r; otherwise the stronger r stays
                into, swap = r, rel == "small_explains"
                break
            rel = relation(rm, m, verdict, disc, h["direction"], fdr_q)  # r inside h?
            if rel is not None:
                into, swap = r, rel == "small_inherits"
                break
        if into is None:
            reps.append(h)
        elif swap:  # h replaces r as the representative of r's group
            h[members] = [into["id"], *into[members]]
            into[members] = []
            for o in hyps:
                if o is into or o.get(key) == into["id"]:
                    o[key] = h["id"]
            reps[reps.index(into)] = h
        else:
            h[key] = into["id"]
            into[members].append(h["id"])
    return sorted(reps, key=_preference)
