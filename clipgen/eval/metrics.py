"""Metric functions on numpy arrays (protocol §6), free of torch so they can be checked against confusion matrices
computed by hand.

Conventions:
- ``labels`` and ``preds`` are integer class indices into the run's class list (``meta["classes"]``).
- ``logits`` is ``[n, num_classes]``; higher is better.
- A metric over an empty group (no images, or no class with an image) is ``nan``. It is computed without numpy
  warnings (no mean of an empty slice, no 0/0), so an empty group never crashes or spams the log.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from clipgen.errors import ClipgenError

NAN = float("nan")


def _as_int(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ClipgenError(f"{name} must be a 1-d array of class indices, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def safe_mean(values) -> float:
    """Mean of ``values``; ``nan`` (without a warning) when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()) if arr.size else NAN


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean per image: the true class is among the ``k`` highest logits. ``k`` is capped at the number of
    classes. A class tied with the true one does not push it out (rank = number of strictly higher logits)."""
    logits = np.asarray(logits)
    labels = _as_int(labels, "labels")
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ClipgenError(f"logits must be [n, num_classes] with n = len(labels) = {labels.shape[0]}, "
                         f"got shape {logits.shape}")
    if labels.size == 0:
        return np.zeros(0, dtype=bool)
    true = logits[np.arange(labels.size), labels]
    rank = (logits > true[:, None]).sum(axis=1)
    return rank < min(k, logits.shape[1])


def accuracy(correct: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Sample-weighted accuracy of a boolean ``correct`` vector, optionally restricted to ``mask``."""
    correct = np.asarray(correct, dtype=bool)
    if mask is not None:
        correct = correct[np.asarray(mask, dtype=bool)]
    return safe_mean(correct)


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, classes: Iterable[int]) -> dict[int, float]:
    """Top-1 accuracy of each class index in ``classes`` over its own images; ``nan`` for a class without any."""
    preds, labels = _as_int(preds, "preds"), _as_int(labels, "labels")
    out = {}
    for c in classes:
        mine = labels == c
        out[int(c)] = safe_mean(preds[mine] == c)
    return out


def unweighted_accuracy(preds: np.ndarray, labels: np.ndarray, classes: Iterable[int]) -> float:
    """Mean of per-class accuracies over those of ``classes`` that have at least one image (each class counts
    once, however many images it has); ``nan`` when none of them has an image."""
    accs = [a for a in per_class_accuracy(preds, labels, classes).values() if not np.isnan(a)]
    return safe_mean(accs)


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[t, p]`` = number of images of true class t predicted as p."""
    preds, labels = _as_int(preds, "preds"), _as_int(labels, "labels")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Macro-F1 over the classes present in ``labels``. Predictions are the full num_classes-way ones, so a
    prediction of an absent class is a false negative of the true class, but absent classes get no F1 of their
    own (which would be 0 by construction and only measure how many classes the task omits)."""
    if _as_int(labels, "labels").size == 0:
        return NAN
    cm = confusion_matrix(preds, labels, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # tp + fn
    predicted = cm.sum(axis=0)  # tp + fp
    present = support > 0
    # 2tp + fp + fn >= support > 0 on present classes, so the division is always defined there.
    f1 = 2.0 * tp[present] / (support[present] + predicted[present])
    return safe_mean(f1)


def lso_metrics(logits: np.ndarray, labels: np.ndarray, domains: Sequence[str], classnames: Sequence[str],
                heldout: Sequence[str], report_domains: Sequence[str], topk: int = 5) -> dict:
    """The DomainNet leave-some-out metrics (protocol §6) for every domain in ``report_domains``.

    ``logits``/``labels`` cover all images of the task (e.g. the test split of real and D), ``domains[i]`` is
    image i's domain, ``classnames`` the run's class list in label order and ``heldout`` the held-out classes
    C2 (a subset of ``classnames``). Images of C2 classes are "ood", the others "id". Keys use the domain name:
    ``{dom}-lso-ood``, ``{dom}-lso-id``, ``{dom}-{class}-ood``, ``{dom}-lso-unweighted-{ood,id}``,
    ``{dom}-top5-{ood,id}``, ``{dom}-macro-f1``, ``{dom}-acc``, ``{dom}-n-ood``, ``{dom}-n-id``.
    """
    logits = np.asarray(logits)
    labels = _as_int(labels, "labels")
    domains = np.asarray(domains, dtype=object)
    if not (logits.shape[0] == labels.shape[0] == domains.shape[0]):
        raise ClipgenError(f"logits ({logits.shape[0]}), labels ({labels.shape[0]}) and domains "
                         f"({domains.shape[0]}) must have one row per image")
    index = {c: i for i, c in enumerate(classnames)}
    missing = [c for c in heldout if c not in index]
    if missing:
        raise ClipgenError(f"held-out classes {missing} are not among the {len(classnames)} class names")
    num_classes = len(classnames)
    ood_idx = [index[c] for c in heldout]
    ood_set = set(ood_idx)
    id_idx = [i for i in range(num_classes) if i not in ood_set]
    preds = logits.argmax(axis=1) if labels.size else np.zeros(0, dtype=np.int64)
    top1 = preds == labels
    topk_ok = topk_correct(logits, labels, topk)
    is_ood = np.isin(labels, ood_idx)

    out: dict = {}
    for dom in report_domains:
        here = domains == dom
        ood, idm = here & is_ood, here & ~is_ood
        out[f"{dom}-lso-ood"] = accuracy(top1, ood)
        out[f"{dom}-lso-id"] = accuracy(top1, idm)
        per_class = per_class_accuracy(preds[here], labels[here], ood_idx)
        for c in heldout:
            out[f"{dom}-{c}-ood"] = per_class[index[c]]
        out[f"{dom}-lso-unweighted-ood"] = unweighted_accuracy(preds[here], labels[here], ood_idx)
        out[f"{dom}-lso-unweighted-id"] = unweighted_accuracy(preds[here], labels[here], id_idx)
        out[f"{dom}-top{topk}-ood"] = accuracy(topk_ok, ood)
        out[f"{dom}-top{topk}-id"] = accuracy(topk_ok, idm)
        out[f"{dom}-macro-f1"] = macro_f1(preds[here], labels[here], num_classes)
        out[f"{dom}-acc"] = accuracy(top1, here)
        out[f"{dom}-n-ood"] = int(ood.sum())
        out[f"{dom}-n-id"] = int(idm.sum())
    return out
