"""``run_analyze(cfg)``: mechanistic analyses of trained runs (protocol §7), one JSON + figures per analysis and
analysed checkpoint (layout: clipgen.analyze.store).

    {run}/analysis/epoch_NNN/sae.json       SAE fit summary, domain x domain feature sharing (C2 and other classes)
                                            with its different-class floor, each domain's score and the test
                                            domain's, named top features
    {run}/analysis/epoch_NNN/geometry.json  distances between domain means (plain, class-conditional and its
                                            different-class floor), per-dimension differences vs real, UMAP
    {run}/analysis/epoch_NNN/cka.json       linear / RBF CKA between domains per layer, over all / held-out / other
                                            classes, and the test domain's mismatched-class floor
    {run}/analysis/epoch_NNN/circuits.json  kept nodes and circuits per domain x class; node / circuit Jaccard per
                                            layer and whole-circuit similarity (WL kernel, Jaccard) between domains,
                                            each with its different-class floor; node Jaccard's chance level
    {run}/analysis/epoch_NNN/*.png          the figures each JSON lists under "figures"
    {run}/analysis/index.json               the analysed epochs and the last one
    {run}/analysis/cache/acts-*.npz         per-channel activations, keyed by weights + images + layers

``analysis.epochs`` chooses the checkpoints (-1: the last evaluated one). Each JSON records a key (the checkpoint's
weights, images, run facts and analysis settings); a rerun with the same key skips it, and a result whose key
another run of the same runs folder already holds (the untrained epoch-0 checkpoint of runs that share a seed has
the same weights) is copied from there instead of computed again.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from clipgen import layout, rundir
from clipgen.analyze import store
from clipgen.analyze.data import RunInfo, load_run, select_images
from clipgen.errors import ClipgenError
from clipgen.files import atomic_write_json, read_json
from clipgen.hashing import sha256_file, stable_hash
from clipgen.procs import torch_threads

log = logging.getLogger("clipgen.analyze")

ANALYSES = store.ANALYSES
# Bump when an analysis changes its numbers, so old results are recomputed. 2: SAE reconstruction error averaged
# over dimensions (was summed), floors and whole-circuit similarity, per-epoch folders, keys by weights.
VERSION = 2


# --- runs ----------------------------------------------------------------------------------------------------
def resolve_run_dirs(cfg: DictConfig) -> list[Path]:
    if cfg.analysis.run_dirs:
        dirs = [Path(str(p)).expanduser().resolve() for p in cfg.analysis.run_dirs]
        for d in dirs:
            if not rundir.is_run(d):
                raise ClipgenError(f"analysis.run_dirs entry {str(d)!r} is not a run directory (no meta.json): "
                                   "expected directories written by clipgen-train")
        return dirs
    runs = layout.runs_root(cfg)
    dirs = sorted(p for p in runs.glob("*") if rundir.is_run(p) and rundir.checkpoints(p))
    if not dirs:
        raise ClipgenError(f"no runs under {runs}: train some first, or set analysis.run_dirs=[...]")
    return dirs


def _device(cfg: DictConfig) -> str:
    import torch

    want = str(cfg.analysis.device)
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want not in ("cpu", "cuda"):
        raise ClipgenError(f"analysis.device={want!r}: expected auto, cpu or cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise ClipgenError("analysis.device=cuda but no CUDA device is visible: expected auto or cpu here")
    return want


def _check_cfg(a) -> list[str]:
    todo = list(a.analyses)
    bad = [x for x in todo if x not in ANALYSES]
    if bad:
        raise ClipgenError(f"analysis.analyses has {bad}: expected some of {list(ANALYSES)}")
    if a.sae_fit_split not in ("train", "test"):
        raise ClipgenError(f"analysis.sae_fit_split={a.sae_fit_split!r}: expected train or test")
    if a.circuit_classes not in ("heldout", "all"):
        raise ClipgenError(f"analysis.circuit_classes={a.circuit_classes!r}: expected heldout or all")
    bad_k = [k for k in a.cka_kernels if k not in ("linear", "rbf")]
    if bad_k:
        raise ClipgenError(f"analysis.cka_kernels has {bad_k}: expected linear and/or rbf")
    if not 0 < float(a.circuit_top_frac) <= 1:
        raise ClipgenError(f"analysis.circuit_top_frac={a.circuit_top_frac}: expected a share in (0, 1]")
    bad_e = [e for e in a.epochs if int(e) < -1]
    if not a.epochs or bad_e:
        raise ClipgenError(f"analysis.epochs={list(a.epochs)}: expected a non-empty list of epoch numbers (-1 = the "
                           "run's last evaluated epoch), e.g. [-1] or [0,-1]")
    if int(a.circuit_wl_iterations) < 0:
        raise ClipgenError(f"analysis.circuit_wl_iterations={a.circuit_wl_iterations}: expected 0 or more")
    if a.sae_vocab_file:
        from clipgen.analyze.sharing import read_vocab

        read_vocab(a.sae_vocab_file)  # a wrong path fails before any work
    return todo


def run_epochs(cfg: DictConfig, run_dir: Path) -> list[RunInfo]:
    """The run's checkpoints to analyse (``analysis.epochs``; -1 = the last evaluated epoch), each once, in
    epoch order."""
    infos = {}
    for e in cfg.analysis.epochs:
        info = load_run(run_dir, int(e))
        infos.setdefault(info.epoch, info)
    return [infos[e] for e in sorted(infos)]


# --- the stage -----------------------------------------------------------------------------------------------
def run_analyze(cfg: DictConfig) -> dict:
    """Run ``analysis.analyses`` at ``analysis.epochs`` on every run of ``analysis.run_dirs`` (default: all runs
    under paths.root)."""
    todo = _check_cfg(cfg.analysis)
    run_dirs = resolve_run_dirs(cfg)
    with torch_threads(int(cfg.analysis.threads)):
        return {"runs": _analyze_runs(cfg, run_dirs, todo, _device(cfg)), "analyses": todo}


def _analyze_runs(cfg: DictConfig, run_dirs: list[Path], todo: list[str], device: str) -> dict:
    """Each run's analyses at each of its epochs: ``{run name: last epoch's result + "epochs": {epoch: result}}``."""
    out = {}
    for run_dir in run_dirs:
        per_epoch = {}
        for info in run_epochs(cfg, run_dir):
            t0, c0 = time.time(), time.process_time()
            res = analyze_run(cfg, info, todo, device)
            res["seconds"], res["cpu_seconds"] = round(time.time() - t0, 2), round(time.process_time() - c0, 2)
            per_epoch[info.epoch] = res
            done = ", ".join(f"{k} ({v})" for k, v in res["analyses"].items())
            print(f"{run_dir.name} epoch {info.epoch}: {done} -> {res['dir']} ({res['seconds']} s, "
                  f"{res['cpu_seconds']} CPU s)")
        last = per_epoch[max(per_epoch)]
        out[run_dir.name] = {**last, "epochs": per_epoch}
    return out


class Context:
    """Everything the analyses of one checkpoint share, loaded lazily (a checkpoint whose results are all current
    loads no model and decodes no image)."""

    def __init__(self, cfg: DictConfig, info: RunInfo, device: str):
        self.cfg, self.a, self.info, self.device = cfg, cfg.analysis, info, device
        self.out_dir = store.epoch_dir(info.run_dir, info.epoch)
        self.cache_dir = store.cache_dir(info.run_dir)
        self.sha = sha256_file(info.checkpoint)
        self.weights = weights_sha256(info.checkpoint)
        self.test = select_images(info, "test", int(self.a.images_per_group), int(self.a.seed))
        self.image_px = int(info.meta.get("image_px") or info.run_cfg.model.image_px)
        self._model = self._head = None

    @property
    def model(self):
        if self._model is None:
            from clipgen.models.kinds import kind_for, load_checkpoint, model_kind

            kind = model_kind(self.info.meta, rundir.meta_path(self.info.run_dir))
            if not kind_for(kind).text_head:
                raise ClipgenError(f"{self.info.run_dir}: model_kind {kind!r}; clipgen-analyze needs a CLIP run "
                                   "(its zero-shot head is the circuits' metric)")
            model, tok, _ = load_checkpoint(self.info.checkpoint, self.info.meta, self.image_px, kind)
            self._model = (model.to(self.device).eval(), tok)
        return self._model

    def layers(self) -> list[str]:
        from clipgen.analyze.activations import check_layers, layer_names

        visual = self.model[0].visual
        chosen = check_layers(visual, list(self.a.layers))
        last = layer_names(visual)[-1]
        return chosen + ([last] if last not in chosen else [])

    def activations(self, imgset=None, layers=None) -> dict[str, np.ndarray]:
        from clipgen.analyze.activations import cached_extract, extract

        imgset = imgset or self.test
        layers = layers or self.layers()
        model = self.model[0]

        def compute():
            imgset.decode(self.image_px)
            return extract(model, imgset.images, layers, int(self.a.batch_size), self.device)

        return cached_extract(self.cache_dir, self.weights, list(imgset.sample_ids), layers, compute)

    def embeddings(self, imgset=None) -> np.ndarray:
        from clipgen.analyze.activations import layer_names

        last = layer_names(self.model[0].visual)[-1]
        emb = self.activations()[last] if imgset is None else self.activations(imgset, [last])[last]
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def head(self):
        """(class embeddings [classes, dim] torch, logit scale) of the run's zero-shot head."""
        if self._head is None:
            from clipgen.facts import zeroshot_templates
            from clipgen.models.zeroshot import class_embeddings, model_logit_scale

            model, tok = self.model
            templates = list(zeroshot_templates(self.cfg.eval.templates))
            self._head = (class_embeddings(model, tok, self.info.classes, templates, self.device),
                          model_logit_scale(model))
        return self._head


def weights_sha256(checkpoint: Path) -> str:
    """sha256 of a checkpoint's weights (every state_dict tensor's name, dtype, shape and bytes, in name order):
    equal for checkpoints that hold the same model whatever else they record (run name, recipe id), such as the
    untrained epoch-0 checkpoints of runs that share a seed."""
    import hashlib

    import torch

    from clipgen.models.checkpoint import load

    state = load(checkpoint)["state_dict"]
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _keys(cfg: DictConfig, ctx: Context, todo: list[str]) -> dict[str, tuple[str, dict]]:
    """Per analysis: the key of its result (the checkpoint's weights, the images, the run facts the analyses read,
    and the settings that change the numbers; memory budgets and devices do not) and those settings."""
    m = ctx.info.meta
    a = OmegaConf.to_container(cfg.analysis, resolve=True)
    common = {"version": VERSION, "weights_sha256": ctx.weights, "test_images": stable_hash(list(ctx.test.sample_ids),
                                                                                           16),
              "seed": a["seed"], "images_per_group": a["images_per_group"], "layers": a["layers"],
              "test_domain": m["test_domain"], "classes": list(m["classes"]),
              "heldout_classes": sorted(m["heldout_classes"])}
    out = {}
    for name in todo:
        prefix = {"sae": "sae_", "geometry": "umap", "cka": "cka_", "circuits": "circuit_"}[name]
        params = {k: v for k, v in a.items() if k.startswith(prefix) and k != "circuit_max_batch_elems"}
        if name in ("sae", "circuits"):
            params["templates"] = str(cfg.eval.templates)
        out[name] = (stable_hash({**common, **params, "analysis": name}, 16), params)
    return out


def pending_analyses(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The requested analyses of ``run_dir`` whose results are missing or stale at any requested epoch, as
    ``name@epoch`` (loads no model)."""
    todo = _check_cfg(cfg.analysis)
    out = []
    for info in run_epochs(cfg, Path(run_dir)):
        ctx = Context(cfg, info, "cpu")
        out += [f"{name}@{info.epoch}" for name, (key, _) in _keys(cfg, ctx, todo).items()
                if not _current(ctx.out_dir / f"{name}.json", key)]
    return out


def analyze_run(cfg: DictConfig, info: RunInfo, todo: list[str], device: str) -> dict:
    """The analyses ``todo`` of one checkpoint: each skipped when current, copied when another run of the same
    runs folder holds a result with the same key, else computed; figures drawn from the result."""
    from clipgen.analyze.compute import COMPUTE
    from clipgen.analyze.draw import DRAW

    store.move_legacy(info.run_dir)
    ctx = Context(cfg, info, device)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    status = {}
    for name, (key, params) in _keys(cfg, ctx, todo).items():
        path = ctx.out_dir / f"{name}.json"
        if _current(path, key):
            status[name] = "up to date"
            continue
        t0, c0 = time.time(), time.process_time()
        donor = _same_key_elsewhere(ctx, name, key)
        result = dict(donor) if donor else COMPUTE[name](ctx)
        result.update(_provenance(ctx, key, params, time.time() - t0, time.process_time() - c0))
        if donor:  # its own seconds are the copy's; the donor's result records what computing it took
            result["reused_from"] = donor["run"]
        result["figures"] = DRAW[name](result, ctx.out_dir, f"{info.run_dir.name}, epoch {info.epoch}")
        atomic_write_json(path, result)
        status[name] = (f"copied from {donor['run']} (same weights)" if donor else
                        f"computed in {time.time() - t0:.1f} s, {time.process_time() - c0:.1f} CPU s")
    store.write_index(info.run_dir)
    return {"epoch": info.epoch, "dir": str(ctx.out_dir), "analyses": status}


def _same_key_elsewhere(ctx: Context, name: str, key: str) -> dict | None:
    """A result with this key (same weights, images, run facts and settings) in another run of the same runs
    folder, computed there (not itself a copy), or None."""
    here = ctx.info.run_dir.resolve()
    pattern = f"*/{store.analysis_root(here).name}/{ctx.out_dir.name}/{name}.json"
    for path in sorted(here.parent.glob(pattern)):
        if path.parents[2].resolve() == here:
            continue
        try:
            res = read_json(path, "analysis result")
        except ClipgenError:
            continue
        if res.get("key") == key and not res.get("reused_from") and res.get("weights_sha256") == ctx.weights:
            return res
    return None


def _current(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        old = read_json(path, "analysis result")
    except ClipgenError:
        return False
    figs = old.get("figures", [])
    return old.get("key") == key and all((path.parent / f).is_file() for f in figs)


def _provenance(ctx: Context, key: str, params: dict, seconds: float, cpu_seconds: float) -> dict:
    from clipgen.facts import DOMAINS
    from clipgen.provenance import git_sha

    m = ctx.info.meta
    return {"key": key, "version": VERSION, "run": m.get("run_name", ctx.info.run_dir.name),
            "recipe_id": m.get("recipe_id"), "recipe_kind": m.get("recipe_kind"), "seed": m.get("seed"),
            "test_domain": m["test_domain"], "model_name": m.get("model_name"), "epoch": ctx.info.epoch,
            "checkpoint": str(ctx.info.checkpoint), "checkpoint_sha256": ctx.sha, "weights_sha256": ctx.weights,
            "settings": params, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "git_sha": git_sha(), "domains": list(DOMAINS), "classes": ctx.info.classes,
            "heldout_classes": list(m["heldout_classes"])}
