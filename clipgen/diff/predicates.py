"""The hypothesis language: slice x behaviour x direction, executable on records and rendered to English.

- A **slice** is a conjunction of conditions on an image: ``domain`` (a domain name), ``class`` (a class name),
  ``combo`` (exposure of its domain x class combination in the two training recipes: both | neither | a_only |
  b_only) and ``domain_seen`` (exposure of its domain). ``{}`` is every image.
- A **behaviour** is something a run does on one image. Per image it yields a side: +1 when only B shows it
  (or B shows it more), -1 when only A does, 0 when they behave alike:
    correct          the prediction is the true class
    true_prob        the true class's probability is higher than the other run's by more than tau
    confident_error  wrong with top probability >= conf
    shortcut_error   wrong, and the predicted class was in this run's training data in this domain (compared
                     only in domains both recipes include: a run that never saw the domain cannot take it)
    confusion        predicts ``target`` (a class other than the true one)
- The **direction** ("A" or "B") is the run the hypothesis says shows the behaviour more often.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipgen.diff.records import EXPOSURE, Records

ATTRIBUTES = ("domain", "class", "combo", "domain_seen")
BEHAVIOURS = ("correct", "true_prob", "confident_error", "shortcut_error", "confusion")


@dataclass(frozen=True)
class BehaviourParams:
    tau: float = 0.1  # true_prob: minimum difference in true-class probability
    conf: float = 0.5  # confident_error: minimum top probability


class Codes:
    """Integer codes of every slice attribute per image, and their value names."""

    def __init__(self, recs: Records):
        self.recs = recs
        self.arrays = {"domain": recs.domain.astype(np.int64), "class": recs.label.astype(np.int64),
                       "combo": recs.combo_code().astype(np.int64),
                       "domain_seen": recs.domain_seen_code().astype(np.int64)}
        self.names = {"domain": list(recs.domains), "class": list(recs.classes), "combo": list(EXPOSURE),
                      "domain_seen": list(EXPOSURE)}

    def code(self, attr: str, value: str) -> int:
        try:
            return self.names[attr].index(value)
        except ValueError:
            return -1

    def mask(self, sl: dict) -> np.ndarray:
        m = np.ones(self.recs.n, dtype=bool)
        for attr, value in sl.items():
            m &= self.arrays[attr] == self.code(attr, value)
        return m


def comparable(recs: Records, behaviour: str) -> np.ndarray:
    """Images on which ``behaviour`` can differ between the runs at all: every image, except for shortcut_error
    (domains both recipes include: a run that never saw the domain cannot take this shortcut, so comparing there
    restates the recipes)."""
    if behaviour == "shortcut_error":
        if not recs.has_exposure:
            return np.zeros(recs.n, dtype=bool)
        return recs.domain_seen_code() == 0
    return np.ones(recs.n, dtype=bool)


def behaviour_side(recs: Records, behaviour: str, target: str | None = None,
                   params: BehaviourParams = BehaviourParams()) -> np.ndarray:
    """+1 / -1 / 0 per image: B shows the behaviour (and A not), A shows it (and B not), alike."""
    if behaviour == "true_prob":
        d = recs.stats_b["p_true"] - recs.stats_a["p_true"]
        return np.where(d > params.tau, 1, np.where(d < -params.tau, -1, 0)).astype(np.int8)
    if behaviour == "correct":
        sa, sb = recs.correct_a, recs.correct_b
    elif behaviour == "confident_error":
        sa = ~recs.correct_a & (recs.stats_a["conf"] >= params.conf)
        sb = ~recs.correct_b & (recs.stats_b["conf"] >= params.conf)
    elif behaviour == "shortcut_error":
        if not recs.has_exposure:
            return np.zeros(recs.n, dtype=np.int8)
        sa = ~recs.correct_a & (recs.counts_a[recs.domain, recs.pred_a] > 0)
        sb = ~recs.correct_b & (recs.counts_b[recs.domain, recs.pred_b] > 0)
        both = comparable(recs, behaviour)
        sa, sb = sa & both, sb & both
    elif behaviour == "confusion":
        k = recs.classes.index(target)
        sa = (recs.pred_a == k) & (recs.label != k)
        sb = (recs.pred_b == k) & (recs.label != k)
    else:
        raise ValueError(f"unknown behaviour {behaviour!r}: expected one of {', '.join(BEHAVIOURS)}")
    return (sb.astype(np.int8) - sa.astype(np.int8))


# --- English -------------------------------------------------------------------------------------------------
_SEEN = {"both": "both runs saw in training", "neither": "neither run saw in training",
         "a_only": "only run A saw in training", "b_only": "only run B saw in training"}


def _list(items: list[str], limit: int = 15) -> str:
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... (+{len(items) - limit} more)"


def slice_cells(codes: Codes, sl: dict) -> list[tuple[str, str]]:
    """The (domain, class) cells a slice covers, in domain then class order."""
    m = codes.mask(sl)
    r = codes.recs
    pairs = np.unique(r.domain[m].astype(np.int64) * len(r.classes) + r.label[m])
    return [(r.domains[p // len(r.classes)], r.classes[p % len(r.classes)]) for p in pairs.tolist()]


def slice_text(codes: Codes, sl: dict) -> str:
    """'On sketch images of classes that only run B saw in sketch in training (axe, barn)' and the like."""
    dom, cls, combo, dseen = (sl.get(k) for k in ATTRIBUTES)
    r = codes.recs
    ds_of = {}
    if r.has_exposure:
        dcode = r.domain_seen_code()
        for i, d in enumerate(r.domains):
            sel = dcode[r.domain == i]
            if len(sel):
                ds_of[d] = EXPOSURE[int(sel[0])]
    if not sl:
        return "On all images"
    if dom and cls:
        note = ""
        if r.has_exposure:
            cc = r.combo_code()[codes.mask(sl)]
            if len(cc):
                note = f" (a combination {_SEEN[EXPOSURE[int(cc[0])]]})"
        return f"On {dom} images of {cls}{note}"
    if dom and not combo:
        note = f" (a domain {_SEEN[ds_of[dom]]})" if ds_of.get(dom, "both") != "both" else ""
        return f"On {dom} images{note}"
    cells = slice_cells(codes, sl)
    if dom and combo:
        return (f"On {dom} images of classes that {_SEEN[combo]} in {dom} "
                f"({_list(sorted({c for _, c in cells}))})")
    if cls and combo:
        return (f"On images of {cls} in domains where {_SEEN[combo].replace('saw', 'saw it')} "
                f"({_list(sorted({d for d, _ in cells}))})")
    if cls:
        return f"On images of {cls}"
    by_dom: dict[str, list[str]] = {}
    for d, c in cells:
        by_dom.setdefault(d, []).append(c)
    listing = "; ".join(f"{d}: {_list(cs, 8)}" for d, cs in by_dom.items())
    if dseen and combo:
        return (f"On images from domains {_SEEN[dseen]} whose domain x class combination "
                f"{_SEEN[combo]} ({listing})")
    if dseen:
        return f"On images from domains {_SEEN[dseen]} ({_list(sorted(by_dom))})"
    return f"On images whose domain x class combination {_SEEN[combo]} ({listing})"


def behaviour_text(behaviour: str, direction: str, target: str | None, params: BehaviourParams) -> str:
    x, y = ("B", "A") if direction == "B" else ("A", "B")
    if behaviour == "correct":
        return f"run {x} is correct more often than run {y}"
    if behaviour == "true_prob":
        return f"run {x} gives the true class a higher probability than run {y} (by more than {params.tau:g})"
    if behaviour == "confident_error":
        return f"run {x} makes more confident errors (wrong with probability >= {params.conf:g}) than run {y}"
    if behaviour == "shortcut_error":
        return (f"run {x} more often predicts a wrong class that it saw in this domain during training "
                f"than run {y} does")
    if behaviour == "confusion":
        return f"run {x} mistakes images for '{target}' more often than run {y}"
    raise ValueError(f"unknown behaviour {behaviour!r}")


def hypothesis_text(codes: Codes, sl: dict, behaviour: str, direction: str, target: str | None,
                    params: BehaviourParams) -> str:
    return f"{slice_text(codes, sl)}, {behaviour_text(behaviour, direction, target, params)}."
