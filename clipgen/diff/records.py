"""Per-image behaviour records of two runs, aligned by sample id, plus what each run saw in training.

A run is read from its directory: ``meta.json`` (classes, held-out classes, test domain, recipe_dir) and
``eval/outputs/epoch_NNN.npz`` (FORMATS.md). Exposure comes from the recipe's ``manifest.json``: ``counts``
(domain -> class -> n) and ``domains``. Everything is a numpy array over the N shared images, so the
generators group with bincount instead of looping over images.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipgen import recipedir, rundir
from clipgen.eval import outputs
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS
from clipgen.files import read_json
from clipgen.hashing import sha256_file

log = logging.getLogger("clipgen.diff")


# Exposure of a domain x class combination (or of a domain) across the two runs; codes stored per image.
EXPOSURE = ("both", "neither", "a_only", "b_only")


@dataclass
class RunInfo:
    name: str
    run_dir: Path
    meta: dict
    manifest: dict | None
    manifest_path: Path | None

    @property
    def recipe_id(self) -> str:
        return str(self.meta.get("recipe_id", "?"))


def resolve_run(spec: str | None, runs_root: Path, key: str) -> Path:
    """A run directory from ``run_a=...``: a path to a run directory, or a run name under ``{root}/runs``."""
    if not spec:
        raise ClipgenError(f"{key} is not set: expected {key}=<run directory or run name under {runs_root}>")
    for cand in (Path(str(spec)).expanduser(), runs_root / str(spec)):
        if rundir.is_run(cand):
            return cand.resolve()
    raise ClipgenError(f"{key}={spec!r}: no run directory with a meta.json there or under {runs_root}")


def _find_manifest(run_dir: Path, meta: dict) -> Path | None:
    found = recipedir.find(meta["recipe_dir"], run_dir) if meta.get("recipe_dir") else None
    return recipedir.manifest_path(found) if found else None


def load_run(run_dir: Path) -> RunInfo:
    meta = rundir.load_meta(run_dir, need=("classes",))
    mpath = _find_manifest(run_dir, meta)
    manifest = read_json(mpath, "recipe manifest") if mpath else None
    if manifest is None:
        log.warning("%s: recipe manifest not found (recipe_dir=%r); exposure slices are left out",
                    run_dir.name, meta.get("recipe_dir"))
    return RunInfo(str(meta.get("run_name") or run_dir.name), run_dir, meta, manifest, mpath)


def evaluated_epochs(run_dir: Path) -> list[int]:
    return [epoch for epoch, _ in rundir.outputs(run_dir)]


def pick_epoch(dirs: list[Path], epoch: int) -> int:
    """``diff.epoch`` if every run has it, or (-1) the last epoch every run evaluated."""
    sets = [set(evaluated_epochs(d)) for d in dirs]
    for d, s in zip(dirs, sets):
        if not s:
            raise ClipgenError(f"{d}: no eval/outputs/epoch_NNN.npz: run clipgen-eval on it first")
    common = set.intersection(*sets)
    if epoch >= 0:
        missing = [str(d) for d, s in zip(dirs, sets) if epoch not in s]
        if missing:
            raise ClipgenError(f"diff.epoch={epoch}: not evaluated in {', '.join(missing)}")
        return epoch
    if not common:
        raise ClipgenError(f"diff.epoch=-1: the runs {', '.join(map(str, dirs))} share no evaluated epoch")
    return max(common)


outputs_path = rundir.output_path


_NPZ_CACHE: dict = {}


def _load_npz(path: Path) -> outputs.Outputs:
    """The arrays of an eval-outputs npz; the last few are kept, since a diff with a null run and seed pairs
    reads run A's outputs several times (keyed by path, size and mtime)."""
    st = path.stat() if path.exists() else None
    key = (str(path), st.st_size, st.st_mtime_ns) if st else None
    if key in _NPZ_CACHE:
        return _NPZ_CACHE[key]
    arrays = _read_npz(path)
    while len(_NPZ_CACHE) >= 3:
        _NPZ_CACHE.pop(next(iter(_NPZ_CACHE)))
    _NPZ_CACHE[key] = arrays
    return arrays


def _read_npz(path: Path) -> dict:
    return outputs.load(path, ("sample_ids", "domains", "labels", "preds", "logits", "image_embeddings"))


def exposure_matrix(manifest: dict | None, domains: list[str], classes: list[str]) -> np.ndarray | None:
    """Training counts ``[domain, class]`` of the recipe (0 where absent); None without a manifest."""
    if manifest is None:
        return None
    counts = manifest.get("counts") or {}
    ci = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(domains), len(classes)), dtype=np.int64)
    for di, d in enumerate(domains):
        for c, n in (counts.get(d) or {}).items():
            if c in ci:
                out[di, ci[c]] = int(n)
    return out


def exposure_code(seen_a: np.ndarray, seen_b: np.ndarray) -> np.ndarray:
    """Index into EXPOSURE for boolean arrays 'A saw it' and 'B saw it'."""
    return np.where(seen_a & seen_b, 0, np.where(~seen_a & ~seen_b, 1, np.where(seen_a, 2, 3))).astype(np.int8)


def _softmax_stats(logits: np.ndarray, labels: np.ndarray) -> dict:
    """True-class probability, rank and logit margin, and the max probability, from logits (= scale x cos)."""
    x = logits.astype(np.float32)
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    p_true = x[rows, labels]
    conf = x.max(axis=1)
    lt = logits[rows, labels].astype(np.float32)
    rank = (logits.astype(np.float32) > lt[:, None]).sum(axis=1).astype(np.int32)  # 0 = top-1
    other = logits.astype(np.float32).copy()
    other[rows, labels] = -np.inf
    margin = lt - other.max(axis=1)
    return {"p_true": p_true, "conf": conf, "rank": rank, "margin": margin}


@dataclass
class Records:
    """The N images both runs were evaluated on; ``*_a`` / ``*_b`` are each run's behaviour."""
    sample_ids: np.ndarray
    domain: np.ndarray  # index into ``domains``
    label: np.ndarray  # index into ``classes``
    domains: list[str]
    classes: list[str]
    heldout_classes: list[str]
    pred_a: np.ndarray
    pred_b: np.ndarray
    stats_a: dict
    stats_b: dict
    emb_a: np.ndarray
    emb_b: np.ndarray
    counts_a: np.ndarray | None  # training exposure [domain, class]
    counts_b: np.ndarray | None
    domains_a: list[str] = field(default_factory=list)  # domains each recipe includes
    domains_b: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.sample_ids)

    @property
    def correct_a(self) -> np.ndarray:
        return self.pred_a == self.label

    @property
    def correct_b(self) -> np.ndarray:
        return self.pred_b == self.label

    @property
    def has_exposure(self) -> bool:
        return self.counts_a is not None and self.counts_b is not None

    def combo_code(self) -> np.ndarray:
        """Per image: was its domain x class combination in A's / B's training recipe (EXPOSURE index)."""
        if not self.has_exposure:
            return np.zeros(self.n, dtype=np.int8)
        return exposure_code(self.counts_a[self.domain, self.label] > 0, self.counts_b[self.domain, self.label] > 0)

    def domain_seen_code(self) -> np.ndarray:
        """Per image: was its domain in A's / B's recipe at all (EXPOSURE index)."""
        if not self.has_exposure:
            return np.zeros(self.n, dtype=np.int8)
        sa = np.array([d in self.domains_a for d in self.domains])
        sb = np.array([d in self.domains_b for d in self.domains])
        return exposure_code(sa, sb)[self.domain]


def build_records(a: RunInfo, b: RunInfo, epoch: int) -> tuple[Records, dict]:
    """Align the two runs' outputs of ``epoch`` by sample id. Returns the records and the inputs' sha256s."""
    if list(a.meta["classes"]) != list(b.meta["classes"]):
        raise ClipgenError(f"{rundir.meta_path(b.run_dir)}: classes differ from {rundir.meta_path(a.run_dir)} "
                           "(expected two runs with the same classification universe)")
    pa, pb = outputs_path(a.run_dir, epoch), outputs_path(b.run_dir, epoch)
    za, zb = _load_npz(pa), _load_npz(pb)
    ids_a, ids_b = za.sample_ids.astype(str), zb.sample_ids.astype(str)
    common, ia, ib = np.intersect1d(ids_a, ids_b, assume_unique=True, return_indices=True)
    if len(common) == 0:
        raise ClipgenError(f"{pa} and {pb} share no sample id (expected evaluations of the same test images)")
    if len(common) < max(len(ids_a), len(ids_b)):
        log.warning("diffing the %d images both runs were evaluated on (A: %d, B: %d)", len(common), len(ids_a),
                    len(ids_b))
    classes = [str(c) for c in a.meta["classes"]]
    dom_names = za.domains.astype(str)[ia]
    present = set(np.unique(dom_names).tolist())
    domains = [d for d in DOMAINS if d in present] + sorted(present - set(DOMAINS))
    uniq, inv = np.unique(dom_names, return_inverse=True)
    dom_idx = np.array([domains.index(d) for d in uniq], dtype=np.int16)[inv]
    labels = za.labels[ia].astype(np.int64)
    if not np.array_equal(labels, zb.labels[ib]):
        raise ClipgenError(f"{pb}: labels differ from {pa} for the same sample ids")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ClipgenError(f"{pa}: labels outside 0..{len(classes) - 1} (the run's classes)")
    la, lb = za.logits[ia], zb.logits[ib]
    if la.shape[1] != len(classes) or lb.shape[1] != len(classes):
        raise ClipgenError(f"{pa}: logits have {la.shape[1]} columns, expected {len(classes)} (the classes)")
    recs = Records(
        sample_ids=common, domain=dom_idx, label=labels, domains=domains, classes=classes,
        heldout_classes=[str(c) for c in a.meta.get("heldout_classes", [])],
        pred_a=za.preds[ia].astype(np.int64), pred_b=zb.preds[ib].astype(np.int64),
        stats_a=_softmax_stats(la, labels), stats_b=_softmax_stats(lb, labels),
        emb_a=za.image_embeddings[ia], emb_b=zb.image_embeddings[ib],
        counts_a=exposure_matrix(a.manifest, domains, classes), counts_b=exposure_matrix(b.manifest, domains, classes),
        domains_a=list((a.manifest or {}).get("domains", [])), domains_b=list((b.manifest or {}).get("domains", [])))
    if recs.counts_a is None or recs.counts_b is None:
        recs.counts_a = recs.counts_b = None
    shas = {"a": sha256_file(pa), "b": sha256_file(pb),
            "manifest_a": sha256_file(a.manifest_path) if a.manifest_path else None,
            "manifest_b": sha256_file(b.manifest_path) if b.manifest_path else None}
    return recs, shas
