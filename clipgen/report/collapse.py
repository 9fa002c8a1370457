"""Prediction concentration per run, and the collapse flag on its headline score.

A model that answers one class for every image of the test domain D scores exactly the share of that class among
the held-out images: with 5 held-out classes that is .200, six times the 30-class chance level, for a model that
has learnt nothing about D. The report therefore shows, per run at its final epoch and per test domain D, how
concentrated its predictions on D's test images are, from the predictions clipgen-eval saved
(``eval/outputs/epoch_NNN.npz``):

- ``top_share``: the share of D's test images predicted as the most-predicted class (``top_class``);
- ``norm_entropy``: the entropy of the predicted-class distribution over D's images divided by log(number of
  classes): 1 = every class predicted equally often, 0 = one class for every image;
- ``constant_score``: the D-lso-ood score of a model that always answers ``top_class``;
- ``collapse``: the run's D-lso-ood score is flagged as collapse when ``top_share >= COLLAPSE_TOP_SHARE`` (at
  least half of D's images go to one class) and ``top_share >= COLLAPSE_OVER_TRUE * true_top_share`` (at least
  twice the share of the commonest true class, so a test set made of one or two classes is never flagged).
  On a balanced test set of K classes a perfect model has top_share = 1/K.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from clipgen import rundir
from clipgen.errors import ClipgenError
from clipgen.eval import outputs

COLLAPSE_TOP_SHARE = 0.5
COLLAPSE_OVER_TRUE = 2.0
COLUMNS = ["run", "recipe_kind", "recipe_id", "model_name", "seed", "test_domain", "epoch", "n_images",
           "num_classes", "top_class", "top_share", "true_top_share", "norm_entropy", "score", "constant_score",
           "collapse"]


def concentration(preds, labels, num_classes: int, ood_labels=()) -> dict:
    """Concentration of ``preds`` (class indices of one domain's images, true classes ``labels``) over
    ``num_classes`` classes; ``score`` / ``constant_score`` are the accuracies on the images whose label is in
    ``ood_labels`` of the model and of the constant answer ``top_class`` (NaN without such images)."""
    preds, labels = np.asarray(preds, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    n = int(preds.size)
    if n == 0:
        return {"n_images": 0, "num_classes": num_classes, "top_class": None, "top_share": math.nan,
                "true_top_share": math.nan, "norm_entropy": math.nan, "score": math.nan,
                "constant_score": math.nan, "collapse": False}
    size = max(num_classes, int(preds.max()) + 1, int(labels.max()) + 1)
    counts = np.bincount(preds, minlength=size)
    top = int(counts.argmax())  # the lowest index on ties: deterministic
    p = counts[counts > 0] / n
    entropy = max(0.0, float(-(p * np.log(p)).sum()))  # one class: -0.0 is shown as 0
    top_share = float(counts[top] / n)
    true_top = float(np.bincount(labels, minlength=size).max() / n)
    ood = np.isin(labels, np.asarray(list(ood_labels), dtype=np.int64))
    score = float((preds[ood] == labels[ood]).mean()) if ood.any() else math.nan
    const = float((labels[ood] == top).mean()) if ood.any() else math.nan
    return {"n_images": n, "num_classes": num_classes, "top_class": top, "top_share": top_share,
            "true_top_share": true_top,
            "norm_entropy": entropy / math.log(num_classes) if num_classes > 1 else math.nan,
            "score": score, "constant_score": const,
            "collapse": bool(top_share >= COLLAPSE_TOP_SHARE and top_share >= COLLAPSE_OVER_TRUE * true_top)}


def run_concentration(run_dir: Path, epoch: int, domains: list[str]) -> list[dict]:
    """Concentration rows of one run at ``epoch`` for each of ``domains``, from its saved predictions; empty when
    the run kept no outputs (``eval.save_outputs=false``) or its files are unreadable."""
    run_dir = Path(run_dir)
    path = rundir.output_path(run_dir, epoch)
    try:
        meta = json.loads(rundir.meta_path(run_dir).read_text(encoding="utf-8"))
        z = outputs.load(path, ("preds", "labels", "domains"))
    except (OSError, ValueError, ClipgenError):
        return []  # the report shows what exists; clipgen-eval reports broken outputs when it runs
    preds, labels, doms = z.preds, z.labels, z.domains.astype(str)
    classes = list(meta.get("classes") or [])
    ood = [classes.index(c) for c in meta.get("heldout_classes") or [] if c in classes]
    rows = []
    for d in domains:
        here = doms == d
        if here.any():
            top = concentration(preds[here], labels[here], len(classes), ood)
            name = classes[top["top_class"]] if top["top_class"] is not None and top["top_class"] < len(classes) \
                else top["top_class"]
            rows.append({"test_domain": d, "epoch": int(epoch), **top, "top_class": name})
    return rows


def collect_concentration(runs: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, test domain of one of its DomainNet tasks) at the epoch of that task's final numbers
    in ``final`` (the long table at each group's final epoch)."""
    out = []
    tasks = final[final["task"].astype(str).str.startswith("domainnet-")]
    for r in runs.to_dict("records"):
        mine = tasks[tasks["run"] == r["run"]]
        for epoch, g in mine.groupby("epoch"):
            doms = sorted(set(g["test_domain"].dropna()))
            for row in run_concentration(Path(r["run_dir"]), int(epoch), doms):
                out.append({"run": r["run"], "recipe_kind": r.get("recipe_kind"), "recipe_id": r.get("recipe_id"),
                            "model_name": r.get("model_name"), "seed": r.get("seed"), **row})
    return pd.DataFrame(out, columns=COLUMNS)
