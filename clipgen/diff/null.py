"""The seed-null control: every A-vs-B hypothesis re-checked between A and another seed of A's configuration.

The check keeps the hypothesis's image set fixed. Its slice is resolved once, on the A-vs-B records (exposure
from A's and B's recipes), and the same images (matched by sample id) are then judged with A's and the null
run's predictions. Re-resolving the slice from the null pair's own recipes would be wrong: A and the null run
share a recipe, so a slice like "combinations only B saw" is empty there and the check would trivially pass.

Per hypothesis (on the verification split, the headline, and on discovery): the A-vs-null verdict counts and
metrics (``metrics.split_metrics``: does the same difference hold between two seeds?) and a one-sided exact sign
test of "A vs B differs more than A vs null" on the verification images of the set: per image, the A-vs-B
verdict minus the A-vs-null verdict toward the predicted side, counted where they differ. ``summarise``
applies Benjamini-Hochberg over the checked hypotheses and writes one honest sentence.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from clipgen.diff.dedup import image_set
from clipgen.diff.metrics import benjamini_hochberg, split_metrics
from clipgen.diff.predicates import behaviour_side
from clipgen.diff.records import Records


class NullControl:
    def __init__(self, verifier, null_recs: Records, run_name: str):
        self.verifier, self.null_recs, self.run = verifier, null_recs, run_name
        main_ids = verifier.recs.sample_ids
        pos = np.searchsorted(null_recs.sample_ids, main_ids)  # build_records returns sorted ids
        pos = np.minimum(pos, max(null_recs.n - 1, 0))
        self.present = (null_recs.n > 0) & (null_recs.sample_ids[pos] == main_ids)
        self.pos = np.where(self.present, pos, -1)
        self._sides: dict = {}

    def _null_side(self, behaviour: str, target: str | None) -> np.ndarray:
        """A-vs-null verdict of ``behaviour`` per A-vs-B image (0 where the null run has no output)."""
        k = (behaviour, target)
        if k not in self._sides:
            s = behaviour_side(self.null_recs, behaviour, target, self.verifier.params)
            out = np.zeros(self.verifier.recs.n, dtype=np.int8)
            out[self.present] = s[self.pos[self.present]]
            self._sides[k] = out
        return self._sides[k]

    def check(self, h: dict) -> dict:
        v = self.verifier
        m = image_set(v, h) & self.present
        v_ab, _ = v.verdicts(h)
        v_an = np.where(m, self._null_side(h["behaviour"], h.get("target")), 0)
        out = {"run": self.run}
        for name, sel in (("verification", v.verify_mask), ("discovery", ~v.verify_mask)):
            sel = sel & self.present
            vv = v_an[sel]
            out[name] = split_metrics(int((vv == -1).sum()), int((vv == 1).sum()), int(m[sel].sum()),
                                      int(sel.sum()), h["direction"], v.alpha)
        out["accepted"] = bool(out["verification"]["accepted"])
        sign = 1 if h["direction"] == "B" else -1
        d = ((v_ab.astype(np.int16) - v_an) * sign)[m & v.verify_mask]
        more, less = int((d > 0).sum()), int((d < 0).sum())
        out["sign_test"] = {"ab_more": more, "null_more": less,
                            "p": float(stats.binom.sf(more - 1, more + less, 0.5)) if more + less else 1.0}
        return out


def summarise(checked: list[dict], null_generators: dict, fdr_q: float) -> dict:
    """Counts over the checked (accepted, distinct) A-vs-B hypotheses; sets ``h["null"]["exceeds"]``."""
    q = benjamini_hochberg([h["null"]["sign_test"]["p"] for h in checked])
    for h, qv in zip(checked, q):
        h["null"]["sign_test"]["q"] = float(qv)
        h["null"]["exceeds"] = bool(qv <= fdr_q)
    m_ab = [h["verification"]["margin"] for h in checked]
    m_n = [h["null"]["verification"]["margin"] for h in checked]
    return {"split": "verification", "checked": len(checked),
            "same_difference": sum(h["null"]["accepted"] for h in checked),
            "exceeds_null": sum(h["null"]["exceeds"] for h in checked),
            "median_margin_ab": float(np.median(m_ab)) if m_ab else None,
            "median_margin_null": float(np.median(m_n)) if m_n else None,
            "null_pair_accepted": sum(int(g["accepted"]) for g in null_generators.values()),
            "null_pair_hypotheses": sum(int(g["hypotheses"]) for g in null_generators.values())}


def sentence(null: dict | None) -> str:
    """The null's result in one sentence for summary.md and the report."""
    if null is None:
        return "No seed-null control was run (pass null_run=<another seed of A's configuration>)."
    if "null_pair_accepted" not in null:  # metrics.json of an older clipgen-diff
        return f"Seed-null control ({null.get('run')}): written by an older clipgen-diff; rerun it for this check."
    own = (f"the seed pair's own diff accepts {null['null_pair_accepted']} of its "
           f"{null['null_pair_hypotheses']} hypotheses" if null["null_pair_hypotheses"]
           else "the seed pair's own diff proposes no hypothesis")
    if not null.get("checked"):
        return (f"Seed-null control ({null['run']}, another seed of A's configuration): no A-vs-B hypothesis was "
                f"accepted on the verification split, so none was re-checked; {own}.")
    n = null["checked"]
    return (f"Seed-null control ({null['run']}, another seed of A's configuration, judged on the same "
            f"verification images as each hypothesis): {null['same_difference']} of {n} accepted hypotheses also "
            f"hold between A and the null run, {null['exceeds_null']} of {n} differ between A and B by "
            f"significantly more than between the two seeds (median margin {null['median_margin_ab']:.3f} vs "
            f"{null['median_margin_null']:.3f}), and {own}.")
