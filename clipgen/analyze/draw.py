"""Figures of one analysis result, drawn from its JSON alone (so a result copied from a run with the same weights
gets figures titled with the run it now belongs to). Each ``draw_x(result, out_dir, title) -> [file names]``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipgen.analyze import plots
from clipgen.facts import DOMAINS


def draw_sae(res: dict, out: Path, title: str) -> list[str]:
    figs = []
    for subset, sub in res["subsets"].items():
        fig = f"sae_sharing_{subset}.png"
        plots.heatmap(sub["matrix"], DOMAINS, out / fig, f"SAE feature sharing, {subset} classes\n{title}")
        figs.append(fig)
    return figs


def draw_geometry(res: dict, out: Path, title: str) -> list[str]:
    plots.heatmap(res["domain_mean_distance"], DOMAINS, out / "geometry_mean_distance.png",
                  f"L2 distance of domain means\n{title}")
    plots.heatmap(res["class_conditional_distance"]["all"], DOMAINS, out / "geometry_class_distance.png",
                  f"class-conditional L2 distance of domain means\n{title}")
    figs = ["geometry_mean_distance.png", "geometry_class_distance.png"]
    for name, u in (res.get("umap") or {}).items():
        fig = f"umap_{name}.png"
        plots.scatter(np.asarray(u["xy"], dtype=np.float64).reshape(-1, 2), np.asarray(u["domains"]), DOMAINS,
                      out / fig, f"UMAP of test embeddings, {name.replace('_', ' ')}\n{title}")
        figs.append(fig)
    return figs


def _row_series(by_layer: dict, layers: list[str], d: int) -> dict:
    return {f"{DOMAINS[d]} vs {DOMAINS[o]}": [by_layer[n][d][o] for n in layers]
            for o in range(len(DOMAINS)) if o != d}


def _floor_mean(values: dict) -> float | None:
    vals = [v for vs in values.values() for v in vs if v is not None]
    return float(np.mean(vals)) if vals else None


def draw_cka(res: dict, out: Path, title: str) -> list[str]:
    d = DOMAINS.index(res["test_domain"])
    layers, figs = res["layers"], []
    for kernel, by_subset in res["cka"].items():
        for subset, by_layer in by_subset.items():
            series = _row_series(by_layer, layers, d)
            floor = (res.get("floor") or {}).get(kernel, {}).get(subset)
            if floor:
                series["floor: classes mismatched (mean)"] = [_floor_mean(floor[n]) for n in layers]
            fig = f"cka_{kernel}_{subset}.png"
            plots.lines(layers, series, out / fig, f"{kernel} CKA per layer, {subset} classes\n{title}", "CKA")
            figs.append(fig)
    return figs


def draw_circuits(res: dict, out: Path, title: str) -> list[str]:
    d = DOMAINS.index(res["test_domain"])
    layers, figs = res["layers"], []
    classes = (res.get("settings") or {}).get("circuit_classes", "heldout")
    for what, lay in (("node_jaccard", layers), ("circuit_jaccard", layers[1:])):
        series = _row_series(res[what], lay, d)
        floor = res.get(f"{what}_floor")
        if floor:
            series["floor: different classes (mean)"] = [
                float(np.nanmean([np.nan if floor[n][d][o] is None else floor[n][d][o]
                                  for o in range(len(DOMAINS)) if o != d])) for n in lay]
        if what == "node_jaccard" and res.get("node_jaccard_chance"):
            series["chance"] = [res["node_jaccard_chance"][n] for n in lay]
        fig = f"circuits_{what}.png"
        plots.lines(lay, series, out / fig, f"{what.replace('_', ' ')} per layer, {classes} classes\n{title}",
                    "Jaccard", (0, 1.02))
        figs.append(fig)
    return figs


DRAW = {"sae": draw_sae, "geometry": draw_geometry, "cka": draw_cka, "circuits": draw_circuits}
