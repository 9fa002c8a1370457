"""Which hypotheses a diff shows first: accepted, distinct, strongest discovery evidence first.

``top_hypotheses`` is the diff's own top list (every generator, cross-generator restatements shown once);
``generator_top`` is one generator's list, as the methods comparison ranks each generator on its own.
"""
from __future__ import annotations


def _hyp_key(h: dict) -> tuple:
    return (tuple(sorted(h["slice"].items())), h["behaviour"], h.get("target"), h["direction"])


def rank_key(h: dict) -> tuple:
    """Strongest evidence first: the discovery McNemar statistic toward the predicted side. (Ranking by effect
    size instead favours small slices picked on discovery, which verify worse.)"""
    return (-h["z"], h["text"])


def top_hypotheses(hyps: list[dict], k: int) -> list[dict]:
    """Accepted (verification) distinct hypotheses of every generator, near-duplicates left out (``dedup``) and
    any remaining same predicate merged, ranked by ``rank_key``."""
    best: dict = {}
    for h in hyps:
        if h["accepted"] and h.get("duplicate_of") is None and h.get("same_as") is None:
            key = _hyp_key(h)
            if key not in best or rank_key(h) < rank_key(best[key]):
                best[key] = h
    return sorted(best.values(), key=rank_key)[:k]


def generator_top(hyps: list[dict], generator: str, k: int) -> list[dict]:
    """One generator's accepted hypotheses without its own near-duplicates, ranked by ``rank_key`` (a hypothesis
    another generator also found still counts for this one)."""
    own = [h for h in hyps if h["generator"] == generator and h["accepted"] and h.get("duplicate_of") is None]
    return sorted(own, key=rank_key)[:k]
