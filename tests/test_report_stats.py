"""The report's seed statistics and collapse flag on hand-made numbers: paired-by-seed differences, intervals
clipped to a metric's range, prediction concentration of a constant predictor."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from clipgen.report.collapse import collect_concentration, concentration
from clipgen.stats import metric_range, paired_differences, t_interval

MATCH = ["task", "test_domain", "model_name", "settings"]


def _final(rows):
    """Long-table rows (kind, recipe id, seed, value[, settings, epoch]) of one task and metric."""
    out = []
    for kind, rid, seed, value, *rest in rows:
        settings, epoch = (rest + ["s1", 3][len(rest):])[:2]
        out.append({"task": "domainnet-sketch", "test_domain": "sketch", "model_name": "m", "settings": settings,
                    "recipe_kind": kind, "recipe_id": rid, "seed": seed, "epoch": epoch,
                    "metric": "sketch-lso-ood", "value": value})
    return pd.DataFrame(out)


def test_paired_differences_by_hand():
    a, b = [0.50, 0.60, 0.70], [0.10, 0.25, 0.32]
    final = _final([("cg_high", "hi", s, v) for s, v in enumerate(a)]
                   + [("cg_low", "lo", s, v) for s, v in enumerate(b)]
                   + [("cg_low", "lo", 3, 0.9),  # no CG-high partner: left out, counted as unpaired
                      ("cg_high", "hi", 0, 0.0, "s2")])  # other settings: never paired with settings s1
    out = paired_differences(final, "sketch-lso-ood", MATCH)
    row = out[(out["kind_a"] == "cg_high") & (out["kind_b"] == "cg_low") & (out["settings"] == "s1")].iloc[0]
    d = np.array(a) - np.array(b)
    half = 4.3027 * d.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    assert row["n"] == 3 and row["seeds"] == "0 1 2" and row["unpaired"] == 1
    assert row["mean"] == pytest.approx(d.mean())
    assert row["ci95_low"] == pytest.approx(d.mean() - half) and row["ci95_high"] == pytest.approx(d.mean() + half)
    assert row["n_better"] == 3 and row["n_worse"] == 0
    assert row["per_seed"] == "0:+0.400 1:+0.350 2:+0.380"
    # the unpaired intervals of the same numbers overlap; the paired one excludes 0
    ia, ib = t_interval(a, 0, 1), t_interval(b, 0, 1)
    assert ia["ci95_low"] < ib["ci95_high"] and row["ci95_low"] > 0
    assert len(out[out["settings"] == "s2"]) == 0  # s2 has CG-high only


def test_paired_differences_only_same_seed_and_epoch():
    final = _final([("lod", "l", 0, 0.4, "s1", 3), ("natural_only", "n", 0, 0.1, "s1", 2),
                    ("lod", "l", 1, 0.4), ("natural_only", "n", 1, 0.3)])
    row = paired_differences(final, "sketch-lso-ood", MATCH).iloc[0]
    assert (row["kind_a"], row["kind_b"], row["n"], row["seeds"]) == ("lod", "natural_only", 1, "1")
    assert row["mean"] == pytest.approx(0.1) and math.isnan(row["ci95_low"]) and math.isnan(row["std"])


def test_intervals_are_clipped_to_the_metric_range():
    low = t_interval([0.0, 0.02, 0.9], *metric_range("sketch-lso-ood"))
    assert low["ci95_low"] == 0.0 and low["ci95_high"] == 1.0 and low["n"] == 3
    unclipped = t_interval([0.0, 0.02, 0.9])
    assert unclipped["ci95_low"] < 0 and unclipped["ci95_high"] > 1
    counts = t_interval([10, 1000], *metric_range("sketch-n-ood"))
    assert counts["ci95_low"] == 0.0 and counts["ci95_high"] > 1000  # counts are bounded below only
    # a difference of accuracies lies in [-1, 1]
    final = _final([("cg_high", "h", s, v) for s, v in enumerate([1.0, 0.0, 1.0])]
                   + [("cg_low", "l", s, v) for s, v in enumerate([0.0, 1.0, 0.0])])
    row = paired_differences(final, "sketch-lso-ood", MATCH).iloc[0]
    assert (row["ci95_low"], row["ci95_high"]) == (-1.0, 1.0) and row["n_worse"] == 1
    nan = t_interval([0.3, float("nan")], 0, 1)
    assert nan["n"] == 1 and math.isnan(nan["ci95_low"]) and nan["mean"] == pytest.approx(0.3)


def test_constant_predictor_is_flagged_as_collapse():
    labels = np.repeat(np.arange(30), 24)  # 720 images, 24 per class; held-out classes 25..29
    ood = range(25, 30)
    const = concentration(np.full(720, 27), labels, 30, ood)
    assert const["top_class"] == 27 and const["top_share"] == 1.0 and const["norm_entropy"] == pytest.approx(0)
    assert const["score"] == pytest.approx(0.2) and const["constant_score"] == pytest.approx(0.2)
    assert const["collapse"]
    perfect = concentration(labels, labels, 30, ood)
    assert perfect["top_share"] == pytest.approx(1 / 30) and perfect["norm_entropy"] == pytest.approx(1.0)
    assert perfect["score"] == 1.0 and not perfect["collapse"]
    # a two-class test set answered perfectly has half its images in one class: not collapse
    two = np.repeat([0, 1], 10)
    assert not concentration(two, two, 30)["collapse"]
    # just under half the images on one class: not flagged
    preds = labels.copy()
    preds[:359] = 3
    assert not concentration(preds, labels, 30, ood)["collapse"]
    preds[:360] = 3
    assert concentration(preds, labels, 30, ood)["collapse"]


def test_concentration_is_read_from_saved_predictions(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "eval" / "outputs").mkdir(parents=True)
    classes = [f"c{i}" for i in range(4)]
    (run_dir / "meta.json").write_text(json.dumps({"classes": classes, "heldout_classes": ["c3"]}))
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    doms = np.array(["real"] * 4 + ["sketch"] * 4)
    preds = np.array([0, 1, 2, 3, 3, 3, 3, 3])  # right on real, one class for every sketch image
    np.savez(run_dir / "eval" / "outputs" / "epoch_002.npz", preds=preds, labels=labels, domains=doms)
    runs = pd.DataFrame([{"run": "r", "run_dir": str(run_dir), "recipe_kind": "cg_low", "recipe_id": "x",
                          "model_name": "m", "seed": 0}])
    final = pd.DataFrame([{"run": "r", "task": "domainnet-sketch", "test_domain": "sketch", "epoch": 2}])
    out = collect_concentration(runs, final)
    assert len(out) == 1
    row = out.iloc[0]
    assert (row["test_domain"], row["top_class"], row["top_share"], row["collapse"]) == ("sketch", "c3", 1.0, True)
    assert row["score"] == 1.0 and row["constant_score"] == 1.0  # c3 is the only held-out class
    final.loc[0, "epoch"] = 1  # no outputs saved for that epoch: nothing to show, no error
    assert collect_concentration(runs, final).empty
