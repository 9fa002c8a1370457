"""Where clipgen-analyze keeps a run's results: one folder per analysed checkpoint, so analysing another epoch
never overwrites the last one.

    {run}/analysis/epoch_NNN/{sae,geometry,cka,circuits}.json   results of the checkpoint of epoch NNN
    {run}/analysis/epoch_NNN/*.png                              the figures each JSON lists under "figures"
    {run}/analysis/index.json                                   the analysed epochs and the last one
    {run}/analysis/cache/acts-*.npz                             activations (keyed by weights, images, layers)

``index.json`` (``{"epochs": [0, 16], "last": 16, "last_dir": "epoch_016", "analyses": {"016": [...]}}``) is
rewritten from the folders after every analysis, so it cannot drift from them; the last epoch is also simply the
highest ``epoch_NNN``.

Before per-epoch folders (analysis VERSION 1) the JSONs and figures lay in ``analysis/`` itself. Those are not
read by the report; ``clipgen-analyze`` moves them into ``epoch_NNN/`` (the epoch each records) the next time it
runs on the run, where they are recomputed because their key is of version 1 (:func:`move_legacy`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from clipgen import rundir
from clipgen.files import atomic_write_json

ANALYSES = ("sae", "geometry", "cka", "circuits")
INDEX = "index.json"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


def analysis_root(run_dir: str | Path) -> Path:
    return rundir.analysis_dir(run_dir)


def epoch_dir(run_dir: str | Path, epoch: int) -> Path:
    return analysis_root(run_dir) / f"epoch_{int(epoch):03d}"


def cache_dir(run_dir: str | Path) -> Path:
    return analysis_root(run_dir) / "cache"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def analysed_epochs(run_dir: str | Path) -> list[int]:
    """Epochs with at least one result JSON in their folder, ascending."""
    root = analysis_root(run_dir)
    found = []
    for p in root.glob("epoch_*") if root.is_dir() else []:
        m = _EPOCH_DIR.match(p.name)
        if m and p.is_dir() and any((p / f"{n}.json").is_file() for n in ANALYSES):
            found.append(int(m.group(1)))
    return sorted(found)


def read_epoch(run_dir: str | Path, epoch: int) -> dict[str, dict]:
    """``{analysis name: result}`` of one analysed epoch (unreadable or foreign JSONs left out)."""
    folder = epoch_dir(run_dir, epoch)
    out = {}
    for name in ANALYSES:
        res = _read(folder / f"{name}.json")
        if res is not None and "test_domain" in res:
            out[name] = res
    return out


def legacy_results(run_dir: str | Path) -> list[Path]:
    """Result JSONs of the single-folder layout (``analysis/{name}.json``)."""
    root = analysis_root(run_dir)
    return [root / f"{n}.json" for n in ANALYSES if (root / f"{n}.json").is_file()]


def move_legacy(run_dir: str | Path) -> list[Path]:
    """Move single-folder results and their figures into ``epoch_NNN/`` (the epoch each JSON records). A file
    already present there is kept and the old one left where it was. Returns the moved JSONs' new paths."""
    moved = []
    for path in legacy_results(run_dir):
        res = _read(path)
        if res is None or not isinstance(res.get("epoch"), int):
            continue
        dest = epoch_dir(run_dir, res["epoch"])
        if (dest / path.name).exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for fig in res.get("figures", []):
            src = path.parent / fig
            if src.is_file() and not (dest / fig).exists():
                src.replace(dest / fig)
        path.replace(dest / path.name)
        moved.append(dest / path.name)
    return moved


def write_index(run_dir: str | Path) -> dict:
    """Rewrite ``analysis/index.json`` from the epoch folders; returns it."""
    epochs = analysed_epochs(run_dir)
    index = {"epochs": epochs, "last": epochs[-1] if epochs else None,
             "last_dir": f"epoch_{epochs[-1]:03d}" if epochs else None,
             "analyses": {f"{e:03d}": sorted(read_epoch(run_dir, e)) for e in epochs}}
    if epochs:
        atomic_write_json(analysis_root(run_dir) / INDEX, index)
    return index
