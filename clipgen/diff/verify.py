"""The deterministic verifier: per image N/A (0), A (-1) or B (+1) for one hypothesis, and its metrics.

An image is N/A when it is outside the hypothesis's slice or when both runs behave alike; otherwise the verdict
names the run that shows the behaviour. The metrics (metrics.py) are computed on the discovery split (where
hypotheses were generated, so every generated hypothesis passes there) and on the held-out verification split,
which decides ``accepted`` (the headline; ``discovery.accepted`` is kept, labelled).
"""
from __future__ import annotations

import numpy as np

from clipgen.diff.metrics import split_metrics
from clipgen.diff.predicates import BehaviourParams, Codes, behaviour_side


class Verifier:
    def __init__(self, codes: Codes, verify_mask: np.ndarray, params: BehaviourParams, alpha: float):
        self.codes, self.recs = codes, codes.recs
        self.verify_mask = verify_mask
        self.params, self.alpha = params, alpha
        self._sides: dict = {}

    def side(self, behaviour: str, target: str | None) -> np.ndarray:
        key = (behaviour, target)
        if key not in self._sides:
            self._sides[key] = behaviour_side(self.recs, behaviour, target, self.params)
        return self._sides[key]

    def verdicts(self, hyp: dict) -> tuple[np.ndarray, np.ndarray]:
        """(verdict per image, slice mask)."""
        m = self.codes.mask(hyp["slice"])
        return np.where(m, self.side(hyp["behaviour"], hyp.get("target")), 0).astype(np.int8), m

    def evaluate(self, hyp: dict, n_evidence: int = 5) -> dict:
        """The hypothesis with ``discovery`` / ``verification`` metrics, ``accepted`` and evidence image ids."""
        v, m = self.verdicts(hyp)
        out = dict(hyp)
        for name, sel in (("discovery", ~self.verify_mask), ("verification", self.verify_mask)):
            vv = v[sel]
            out[name] = split_metrics(int((vv == -1).sum()), int((vv == 1).sum()), int(m[sel].sum()), int(sel.sum()),
                                      hyp["direction"], self.alpha)
        out["accepted"] = bool(out["verification"]["accepted"])
        want = 1 if hyp["direction"] == "B" else -1
        idx = np.flatnonzero((v == want) & self.verify_mask)
        if len(idx) == 0:
            idx = np.flatnonzero(v == want)
        # strongest evidence first: the largest true-class probability gain of the predicted run
        gain = (self.recs.stats_b["p_true"] - self.recs.stats_a["p_true"])[idx] * want
        idx = idx[np.lexsort((self.recs.sample_ids[idx], -gain))][:n_evidence]
        out["evidence"] = [str(s) for s in self.recs.sample_ids[idx]]
        return out

    def margin_all(self, hyp: dict) -> tuple[bool, float]:
        """Accepted on every image (no split) and its margin: used for seed-null and seed-consistency checks."""
        v, m = self.verdicts(hyp)
        met = split_metrics(int((v == -1).sum()), int((v == 1).sum()), int(m.sum()), len(v), hyp["direction"],
                            self.alpha)
        return bool(met["accepted"]), float(met["margin"])
