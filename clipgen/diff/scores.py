"""Interestingness and abstraction on the diffing paper's 1-5 scales, by explicit rules (no model in the loop).

Each score is the mean of its sub-scores rounded half up (all 1-5), computed from the hypothesis, its discovery counts
and the two recipes' exposure:

Interestingness
- impact: |margin| on discovery (predicted share minus other share of the slice):
  >= 0.4 -> 5, >= 0.2 -> 4, >= 0.1 -> 3, >= 0.05 -> 2, else 1.
- novelty vs the recipes' design: the study designs exposure differences, so a difference where the run that saw
  the slice's combinations (or domain) does better is expected. Share x of the slice's images whose exposure
  differs between the runs; "better" = correct / true_prob, "worse" = the error behaviours and confusions.
  x >= 0.5 and the better run is the one that saw them (or the worse run the one that did not) -> 2 (by design);
  x >= 0.5 and the opposite -> 5 (against the design); 0 < x < 0.5 -> 3; x = 0 (exposure equal) -> 4;
  no manifests -> 3.
- specificity: 1 + number of slice conditions (at most 2) + 1 for an error-type behaviour (confident, shortcut,
  confusion) + 1 for a named confusion target, capped at 5.
- actionability: can a recipe change address it? exposure condition -> 5, domain condition -> 4, class
  condition only -> 3, all images -> 2.

Abstraction
- scope: share of all evaluation images in the slice: >= 0.5 -> 5, >= 0.2 -> 4, >= 0.05 -> 3, >= 0.01 -> 2, else 1.
- generality: all images -> 5; one domain / exposure condition -> 4; an exposure condition with a domain or class
  -> 3; a single class -> 2; a single domain x class cell -> 1.
- depth: correct -> 2, confusion -> 2, true_prob -> 3, confident_error -> 3, shortcut_error -> 4 (ties an error to
  the training data); +1 when the slice is described by training exposure; capped at 5.
"""
from __future__ import annotations

import numpy as np

from clipgen.diff.predicates import Codes

_GOOD = ("correct", "true_prob")


def _bucket(x: float, edges: tuple[float, ...]) -> int:
    """5 for x >= edges[0], 4 for >= edges[1], ... , 1 below the last edge."""
    for i, e in enumerate(edges):
        if x >= e:
            return 5 - i
    return 1


def _half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _novelty(codes: Codes, hyp: dict, mask: np.ndarray) -> int:
    recs = codes.recs
    if not recs.has_exposure or not mask.any():
        return 3
    combo = codes.arrays["combo"][mask]
    dseen = codes.arrays["domain_seen"][mask]
    # per image: which run saw it when exposure differs (2 = a_only, 3 = b_only); domain exposure first
    who = np.where(dseen >= 2, dseen, combo)
    differs = who >= 2
    x = float(differs.mean())
    if x == 0:
        return 4
    if x < 0.5:
        return 3
    saw_b = float((who[differs] == 3).mean()) >= 0.5
    predicted_b = hyp["direction"] == "B"
    good = hyp["behaviour"] in _GOOD
    expected = (predicted_b == saw_b) if good else (predicted_b != saw_b)
    return 2 if expected else 5


def score(codes: Codes, hyp: dict, mask: np.ndarray | None = None) -> tuple[dict, dict]:
    """(interestingness, abstraction), each ``{"score": 1..5, <sub-score>: 1..5, ...}``."""
    sl = hyp["slice"]
    mask = codes.mask(sl) if mask is None else mask
    conds = set(sl)
    exposure = bool(conds & {"combo", "domain_seen"})
    beh = hyp["behaviour"]
    impact = _bucket(abs(hyp["discovery"]["margin"]), (0.4, 0.2, 0.1, 0.05))
    novelty = _novelty(codes, hyp, mask)
    specificity = min(5, 1 + min(len(conds), 2) + (beh not in _GOOD) + (hyp.get("target") is not None))
    if exposure:
        actionability = 5
    elif "domain" in conds:
        actionability = 4
    elif "class" in conds:
        actionability = 3
    else:
        actionability = 2
    inter = {"impact": impact, "novelty": novelty, "specificity": specificity, "actionability": actionability}

    scope = _bucket(float(mask.mean()) if len(mask) else 0.0, (0.5, 0.2, 0.05, 0.01))
    if not conds:
        generality = 5
    elif len(conds) == 1 and conds <= {"domain", "combo", "domain_seen"}:
        generality = 4
    elif exposure:
        generality = 3
    elif conds == {"class"}:
        generality = 2
    else:
        generality = 1
    depth = {"correct": 2, "confusion": 2, "true_prob": 3, "confident_error": 3, "shortcut_error": 4}[beh]
    depth = min(5, depth + exposure)
    abst = {"scope": scope, "generality": generality, "depth": depth}
    inter["score"] = _half_up(np.mean([inter[k] for k in ("impact", "novelty", "specificity", "actionability")]))
    abst["score"] = _half_up(np.mean([abst[k] for k in ("scope", "generality", "depth")]))
    return inter, abst
