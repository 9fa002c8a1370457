"""The sharing measures of analysed checkpoints as one flat table: per run, epoch, measure and layer, the value
between the test domain D and the other domains on the held-out classes C2, with its floor and chance level.

A value is the mean over the five other domains o of the measure between D and o (the paper's SAE score is
exactly this: the mean off-diagonal of D's row). Floors are the same measure with different classes paired
(clipgen.analyze.compute); the chance level is that of node Jaccard for a layer's size.

| measure | what | layers |
|---|---|---|
| ``sae`` | SAE feature sharing (top features of the same class) | the embedding (the last layer) |
| ``cka_linear``, ``cka_rbf`` | CKA of the per-class mean activations | every layer |
| ``node_jaccard`` | Jaccard of the kept circuit nodes (top channels by IG) | every layer |
| ``circuit_jaccard`` | Jaccard of the circuit edges into the layer | every layer but the first |
| ``circuit_wl`` | WL subtree kernel of the whole circuit graph | ``whole circuit`` |
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from clipgen.analyze import store
from clipgen.facts import DOMAINS
from clipgen.rundir import settings_part

MEASURES = {"sae": "SAE feature sharing", "cka_linear": "linear CKA", "cka_rbf": "RBF CKA",
            "node_jaccard": "node Jaccard", "circuit_jaccard": "circuit (edge) Jaccard",
            "circuit_wl": "whole-circuit WL kernel"}
WHOLE = "whole circuit"
COLUMNS = ["run", "recipe_kind", "recipe_id", "seed", "model_name", "settings", "test_domain", "epoch",
           "weights_sha256", "measure", "layer", "layer_index", "value", "floor", "chance"]


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _row_mean(matrix, d: int) -> float:
    """Mean of ``matrix[d][o]`` over the other domains o (NaN entries left out)."""
    if not matrix:
        return float("nan")
    vals = [_num(matrix[d][o]) for o in range(len(DOMAINS)) if o != d]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _floor_lists_mean(by_domain: dict | None) -> float:
    vals = [_num(v) for vs in (by_domain or {}).values() for v in vs]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def rows_of(results: dict[str, dict]) -> list[dict]:
    """Rows (:data:`COLUMNS` minus the run's facts) of one analysed checkpoint's results
    (``{analysis name: result}``)."""
    first = next(iter(results.values()))
    d = DOMAINS.index(first["test_domain"])
    rows = []

    def add(measure, layer, index, value, floor, chance=float("nan")):
        rows.append({"measure": measure, "layer": layer, "layer_index": index, "value": value, "floor": floor,
                     "chance": chance})

    layers = (results.get("cka") or results.get("circuits") or {}).get("layers") or []
    sae = ((results.get("sae") or {}).get("subsets") or {}).get("heldout")
    if sae:
        add("sae", layers[-1] if layers else "embedding", len(layers) - 1 if layers else 0,
            _num(sae["test_domain_score"]), _num(sae.get("test_domain_floor")))
    cka = results.get("cka") or {}
    for kernel in cka.get("kernels", []):
        for i, layer in enumerate(cka["layers"]):
            add(f"cka_{kernel}", layer, i, _row_mean(cka["cka"][kernel].get("heldout", {}).get(layer), d),
                _floor_lists_mean(((cka.get("floor") or {}).get(kernel) or {}).get("heldout", {}).get(layer)))
    circ = results.get("circuits") or {}
    for what in ("node_jaccard", "circuit_jaccard"):
        for i, layer in enumerate(circ.get("layers", [])):
            if layer in circ.get(what, {}):
                chance = _num((circ.get("node_jaccard_chance") or {}).get(layer)) if what == "node_jaccard" \
                    else float("nan")
                add(what, layer, i, _row_mean(circ[what][layer], d),
                    _row_mean((circ.get(f"{what}_floor") or {}).get(layer), d), chance)
    whole = circ.get("whole_circuit") or {}
    if whole:
        add("circuit_wl", WHOLE, len(circ["layers"]), _row_mean(whole["wl"], d), _row_mean(whole["wl_floor"], d))
    return rows


def collect(run_dirs: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """(the table over every analysed epoch of ``run_dirs``, the runs that still hold results in the layout before
    per-epoch folders)."""
    rows, legacy = [], []
    for run_dir in map(Path, run_dirs):
        if store.legacy_results(run_dir):
            legacy.append(run_dir.name)
        for epoch in store.analysed_epochs(run_dir):
            results = store.read_epoch(run_dir, epoch)
            results = {n: r for n, r in results.items() if r.get("version", 1) >= 2}
            if not results:
                continue
            first = next(iter(results.values()))
            facts = {"run": first.get("run") or run_dir.name, "recipe_kind": first.get("recipe_kind") or "",
                     "recipe_id": first.get("recipe_id") or "", "seed": first.get("seed"),
                     "model_name": first.get("model_name") or "", "settings": settings_part(str(first.get("run"))),
                     "test_domain": first["test_domain"], "epoch": int(first["epoch"]),
                     "weights_sha256": first.get("weights_sha256")}
            rows += [{**facts, **r} for r in rows_of(results)]
    return pd.DataFrame(rows, columns=COLUMNS), legacy


def with_accuracy(table: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """``table`` plus ``accuracy``: each run's ``{D}-lso-ood`` at the analysed epoch (NaN where that epoch was
    not evaluated), from the report's long table of evaluation results."""
    if table.empty:
        return table.assign(accuracy=pd.Series(dtype=float))
    acc = long[(long["task"] == "domainnet-" + long["test_domain"].astype(str))
               & (long["metric"] == long["test_domain"].astype(str) + "-lso-ood")]
    # natural-only runs are evaluated on every test domain's task: match the analysis's own test domain
    acc = acc.groupby(["run", "epoch", "test_domain"], as_index=False)["value"].mean()
    return table.merge(acc.rename(columns={"value": "accuracy"}), on=["run", "epoch", "test_domain"], how="left")
