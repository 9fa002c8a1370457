"""Synthetic run directories for tests and the benchmark: eval outputs with known, planted behaviour.

``write_run`` writes what clipgen-diff reads (FORMATS.md): ``{root}/runs/{name}/meta.json``,
``eval/outputs/epoch_NNN.npz`` and a recipe ``{root}/recipes/{name}-recipe/manifest.json``. Correctness is
given per image; logits put the true class (if correct) or a seeded wrong class (if wrong) on top, so
probabilities, ranks and margins are consistent with the predictions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipgen import recipedir, rundir
from clipgen.eval import outputs as eval_outputs
from clipgen.files import atomic_write_json


def make_test_set(domains: list[str], classes: list[str], per_cell: int | np.ndarray) -> dict:
    """Images of every domain x class cell: sample ids, domain names, labels."""
    per = np.broadcast_to(np.asarray(per_cell), (len(domains), len(classes)))
    ids, doms, labels = [], [], []
    for di, d in enumerate(domains):
        for ci, c in enumerate(classes):
            n = int(per[di, ci])
            ids += [f"{d}/{c.replace(' ', '_')}/{d}_{ci:03d}_{j:06d}" for j in range(n)]
            doms += [d] * n
            labels += [ci] * n
    return {"sample_ids": np.array(ids), "domains": np.array(doms), "labels": np.array(labels, dtype=np.int64)}


def outputs(ts: dict, correct: np.ndarray, n_classes: int, seed: int, emb_dim: int = 16) -> eval_outputs.Outputs:
    """Evaluation outputs of one run: ``correct[i]`` decides whether image i's top logit is its true class."""
    rng = np.random.default_rng(seed)
    n = len(ts["labels"])
    labels = ts["labels"]
    logits = rng.normal(0.0, 1.0, size=(n, n_classes)).astype(np.float32)
    wrong = (labels + rng.integers(1, max(n_classes, 2), size=n)) % n_classes
    top = np.where(correct, labels, wrong)
    rows = np.arange(n)
    logits[rows, top] = logits.max(axis=1) + rng.uniform(0.5, 3.0, size=n).astype(np.float32)
    _, dom_idx = np.unique(ts["domains"], return_inverse=True)
    centers = np.random.default_rng(12345).normal(size=(n_classes + 8, emb_dim))  # shared geometry
    emb = centers[labels] + 0.5 * centers[n_classes + dom_idx % 8] + rng.normal(0, 0.3, size=(n, emb_dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return eval_outputs.Outputs(sample_ids=ts["sample_ids"], domains=ts["domains"], labels=labels,
                                preds=logits.argmax(axis=1).astype(np.int64), logits=logits.astype(np.float16),
                                image_embeddings=emb.astype(np.float16), logit_scale=np.float32(10.0))


def write_run(root: Path, name: str, arrays: eval_outputs.Outputs, classes: list[str], heldout: list[str],
              test_domain: str, counts: dict, epoch: int = 2, seed: int = 0, recipe_id: str | None = None,
              compressed: bool = True) -> Path:
    """A run directory with one evaluated epoch and its recipe manifest (``counts``: domain -> class -> n)."""
    root = Path(root)
    run_dir = root / "runs" / name
    rid = recipe_id or name
    recipe_dir = root / "recipes" / f"{rid}-recipe"
    atomic_write_json(recipedir.manifest_path(recipe_dir), {
        "recipe_id": rid, "kind": "synthetic", "test_domain": test_domain, "domains": sorted(counts),
        "classes": classes, "heldout_classes": heldout, "counts": counts,
        "num_samples": int(sum(sum(c.values()) for c in counts.values()))})
    rundir.write_meta(run_dir, {
        "run_name": name, "recipe_id": rid, "recipe_kind": "synthetic", "recipe_dir": str(recipe_dir),
        "test_domain": test_domain, "heldout_classes": heldout, "classes": classes, "seed": seed,
        "model_name": "synthetic", "epochs": epoch, "status": "finished"})
    a = arrays
    eval_outputs.save(rundir.output_path(run_dir, epoch), a.sample_ids, a.domains, a.labels, a.preds, a.logits,
                      a.image_embeddings, a.logit_scale, compressed)
    return run_dir


def counts_matrix(domains: list[str], classes: list[str], n: int = 20, absent: set | None = None) -> dict:
    """Recipe counts: ``n`` per domain x class except the (domain, class) pairs in ``absent``."""
    absent = absent or set()
    return {d: {c: n for c in classes if (d, c) not in absent} for d in domains}
