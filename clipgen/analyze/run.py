"""``run_analyze(cfg)``: mechanistic analyses of trained runs (protocol §7), one JSON + figures per analysis.

    {run}/analysis/sae.json        SAE fit summary, domain x domain feature sharing (C2 and other classes), each
                                   domain's score and the test domain's, named top features
    {run}/analysis/geometry.json   distances between domain means (plain, class-conditional), per-dimension mean
                                   differences vs real, UMAP coordinates
    {run}/analysis/cka.json        linear / RBF CKA between domains per layer, over all / held-out / other classes
    {run}/analysis/circuits.json   kept nodes and circuits per domain x class, their Jaccard between domains
    {run}/analysis/*.png           the figures each JSON lists under "figures"
    {run}/analysis/cache/acts-*.npz per-channel activations, keyed by checkpoint sha256 + images + layers

Each JSON records a key (checkpoint sha256, images, analysis settings); a rerun with the same key skips it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from clipgen import layout, rundir
from clipgen.analyze import plots
from clipgen.analyze.data import RunInfo, compare_with_eval, load_run, select_images
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS, DOMAIN_TERMS, NATURAL_DOMAIN
from clipgen.files import atomic_write_json, read_json
from clipgen.hashing import sha256_file, stable_hash

log = logging.getLogger("clipgen.analyze")

ANALYSES = ("sae", "geometry", "cka", "circuits")
VERSION = 1  # bump when an analysis changes its numbers, so old results are recomputed


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
    if a.sae_vocab_file:
        from clipgen.analyze.sharing import read_vocab

        read_vocab(a.sae_vocab_file)  # a wrong path fails before any work
    return todo


# --- the stage -----------------------------------------------------------------------------------------------
def run_analyze(cfg: DictConfig) -> dict:
    """Run ``analysis.analyses`` on every run of ``analysis.run_dirs`` (default: all runs under paths.root)."""
    import torch

    todo = _check_cfg(cfg.analysis)
    run_dirs = resolve_run_dirs(cfg)
    if cfg.analysis.threads:
        torch.set_num_threads(int(cfg.analysis.threads))
    device = _device(cfg)
    out = {}
    for run_dir in run_dirs:
        t0 = time.time()
        res = analyze_run(cfg, run_dir, todo, device)
        res["seconds"] = round(time.time() - t0, 2)
        out[run_dir.name] = res
        done = ", ".join(f"{k} ({v})" for k, v in res["analyses"].items())
        print(f"{run_dir.name} epoch {res.get('epoch')}: {done} -> {res['dir']} ({res['seconds']} s)")
    return {"runs": out, "analyses": todo}


class _Context:
    """Everything the analyses of one run share, loaded lazily (a run whose results are all current loads no
    model and decodes no image)."""

    def __init__(self, cfg: DictConfig, info: RunInfo, device: str):
        self.cfg, self.a, self.info, self.device = cfg, cfg.analysis, info, device
        self.out_dir = rundir.analysis_dir(info.run_dir)
        self.cache_dir = self.out_dir / "cache"
        self.sha = sha256_file(info.checkpoint)
        self.test = select_images(info, "test", int(self.a.images_per_group), int(self.a.seed))
        self.image_px = int(info.meta.get("image_px") or info.run_cfg.model.image_px)
        self._model = self._acts = self._head = None

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

        return cached_extract(self.cache_dir, self.sha, list(imgset.sample_ids), layers, compute)

    def embeddings(self, imgset=None) -> np.ndarray:
        from clipgen.analyze.activations import layer_names

        last = layer_names(self.model[0].visual)[-1]
        if imgset is None:
            emb = self.activations()[last]
        else:
            emb = self.activations(imgset, [last])[last]
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


def _keys(cfg: DictConfig, ctx: "_Context", todo: list[str]) -> dict[str, tuple[str, dict]]:
    """Per analysis: the key of its result (checkpoint, images and the settings that change the numbers; memory
    budgets and devices do not) and those settings."""
    ids_hash = stable_hash(list(ctx.test.sample_ids), 16)
    a = OmegaConf.to_container(cfg.analysis, resolve=True)
    common = {"version": VERSION, "checkpoint_sha256": ctx.sha, "test_images": ids_hash, "seed": a["seed"],
              "images_per_group": a["images_per_group"], "layers": a["layers"]}
    out = {}
    for name in todo:
        prefix = {"sae": "sae_", "geometry": "umap", "cka": "cka_", "circuits": "circuit_"}[name]
        params = {k: v for k, v in a.items() if k.startswith(prefix) and k != "circuit_max_batch_elems"}
        if name in ("sae", "circuits"):
            params["templates"] = str(cfg.eval.templates)
        out[name] = (stable_hash({**common, **params, "analysis": name}, 16), params)
    return out


def pending_analyses(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The requested analyses of ``run_dir`` whose results are missing or stale (loads no model)."""
    todo = _check_cfg(cfg.analysis)
    ctx = _Context(cfg, load_run(Path(run_dir), int(cfg.analysis.epoch)), "cpu")
    return [name for name, (key, _) in _keys(cfg, ctx, todo).items()
            if not _current(ctx.out_dir / f"{name}.json", key)]


def analyze_run(cfg: DictConfig, run_dir: Path, todo: list[str], device: str) -> dict:
    info = load_run(run_dir, int(cfg.analysis.epoch))
    ctx = _Context(cfg, info, device)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    status = {}
    for name, (key, params) in _keys(cfg, ctx, todo).items():
        path = ctx.out_dir / f"{name}.json"
        if _current(path, key):
            status[name] = "up to date"
            continue
        t0 = time.time()
        result = {"sae": _sae, "geometry": _geometry, "cka": _cka, "circuits": _circuits}[name](ctx)
        result.update(_provenance(ctx, key, params, time.time() - t0))
        atomic_write_json(path, result)
        status[name] = f"computed in {time.time() - t0:.1f} s"
    return {"epoch": info.epoch, "dir": str(ctx.out_dir), "analyses": status}


def _current(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        old = read_json(path, "analysis result")
    except ClipgenError:
        return False
    figs = old.get("figures", [])
    return old.get("key") == key and all((path.parent / f).is_file() for f in figs)


def _provenance(ctx: _Context, key: str, params: dict, seconds: float) -> dict:
    from clipgen.provenance import git_sha

    m = ctx.info.meta
    return {"key": key, "run": m.get("run_name", ctx.info.run_dir.name), "recipe_id": m.get("recipe_id"),
            "recipe_kind": m.get("recipe_kind"), "seed": m.get("seed"), "test_domain": m["test_domain"],
            "model_name": m.get("model_name"), "epoch": ctx.info.epoch, "checkpoint": str(ctx.info.checkpoint),
            "checkpoint_sha256": ctx.sha, "settings": params, "seconds": round(seconds, 3),
            "git_sha": git_sha(), "domains": list(DOMAINS), "classes": ctx.info.classes,
            "heldout_classes": list(m["heldout_classes"])}


def _subsets(info: RunInfo) -> dict[str, list[int]]:
    return {"all": list(range(len(info.classes))), "heldout": info.heldout_idx, "other": info.other_idx}


# --- SAE feature sharing -------------------------------------------------------------------------------------
def _sae(ctx: _Context) -> dict:
    import torch

    from clipgen.analyze import sharing
    from clipgen.analyze.sae import encode, train_sae

    a, info = ctx.a, ctx.info
    test_emb = ctx.embeddings()
    if a.sae_fit_split == "train":
        fit_set = select_images(info, "train", int(a.sae_fit_per_group), int(a.seed))
        fit_emb = ctx.embeddings(fit_set)
    else:
        fit_emb = test_emb
    dim = test_emb.shape[1]
    sae, summary = train_sae(fit_emb, int(a.sae_expansion) * dim, int(a.sae_steps), int(a.sae_batch_size),
                             float(a.sae_lr), float(a.sae_l1), int(a.seed), ctx.device)
    codes = encode(sae, test_emb)
    d, res = info.meta["test_domain"], {"sae": summary, "fit_split": str(a.sae_fit_split),
                                        "fit_images": int(len(fit_emb)), "ks": list(a.sae_ks),
                                        "top_active": int(a.sae_top_active), "subsets": {}, "figures": []}
    for subset, idx in _subsets(info).items():
        if subset == "all" or not idx:
            continue
        hist, counts = sharing.histograms(codes, ctx.test.domains, ctx.test.labels, DOMAINS, idx,
                                          int(a.sae_top_active))
        mat = sharing.share_matrix(hist, counts, list(a.sae_ks))
        scores = sharing.domain_scores(mat, DOMAINS)
        fig = f"sae_sharing_{subset}.png"
        plots.heatmap(mat, DOMAINS, ctx.out_dir / fig, f"SAE feature sharing, {subset} classes\n{info.run_dir.name}")
        res["figures"].append(fig)
        res["subsets"][subset] = {"classes": [info.classes[i] for i in idx], "matrix": _jm(mat),
                                  "domain_scores": scores, "test_domain_score": scores[d],
                                  "images": counts.tolist()}
        if subset == "heldout":
            top = {}
            for di, dom in enumerate(DOMAINS):
                tot = hist[:, di].sum(axis=0)
                order = np.argsort(-tot, kind="stable")[:int(a.sae_named_features)]
                top[dom] = [int(f) for f in order if tot[f] > 0]
            res["top_features"] = top
    vocab = (sharing.read_vocab(a.sae_vocab_file) if a.sae_vocab_file else
             list(dict.fromkeys(info.classes + [t for pair in DOMAIN_TERMS.values() for t in pair])))
    feats = sorted({f for fs in res.get("top_features", {}).values() for f in fs})
    if feats:
        from clipgen.facts import zeroshot_templates
        from clipgen.models.zeroshot import class_embeddings

        model, tok = ctx.model
        with torch.no_grad():
            txt = class_embeddings(model, tok, vocab, list(zeroshot_templates(ctx.cfg.eval.templates)),
                                   ctx.device).cpu().numpy()
        names = sharing.concept_names(sae.w_dec.detach().numpy(), txt, vocab, feats)
        res["concepts"] = {str(k): v for k, v in names.items()}
    res["vocabulary"] = {"source": str(a.sae_vocab_file) if a.sae_vocab_file else "run classes + domain words",
                         "size": len(vocab)}
    res["test_domain_score"] = res["subsets"].get("heldout", {}).get("test_domain_score")
    return res


# --- embedding geometry --------------------------------------------------------------------------------------
def _geometry(ctx: _Context) -> dict:
    from clipgen.analyze import geometry as G

    a, info, t = ctx.a, ctx.info, ctx.test
    emb = ctx.embeddings()
    res = {"figures": [], "images": int(len(emb)), "eval_check": compare_with_eval(info, t.sample_ids, emb)}
    dist = G.domain_mean_distances(emb, t.domains, DOMAINS)
    res["domain_mean_distance"] = _jm(dist)
    plots.heatmap(dist, DOMAINS, ctx.out_dir / "geometry_mean_distance.png",
                  f"L2 distance of domain means\n{info.run_dir.name}")
    res["figures"].append("geometry_mean_distance.png")
    res["class_conditional_distance"] = {}
    for subset, idx in _subsets(info).items():
        if idx:
            res["class_conditional_distance"][subset] = _jm(
                G.class_conditional_distances(emb, t.domains, t.labels, DOMAINS, idx))
    plots.heatmap(res["class_conditional_distance"]["all"], DOMAINS, ctx.out_dir / "geometry_class_distance.png",
                  f"class-conditional L2 distance of domain means\n{info.run_dir.name}")
    res["figures"].append("geometry_class_distance.png")
    diffs = G.per_dimension_differences(emb, t.domains, DOMAINS, NATURAL_DOMAIN)
    res["per_dimension_difference_vs_real"] = diffs
    res["per_dimension_summary"] = {d: {"max_abs": round(float(np.max(np.abs(v))), 6),
                                        "top_dims": [int(i) for i in np.argsort(-np.abs(v), kind="stable")[:5]]}
                                    for d, v in diffs.items()}
    if a.umap:
        res["umap"] = {}
        for name, keep_dom in (("all", DOMAINS), ("no_quickdraw", tuple(x for x in DOMAINS if x != "quickdraw"))):
            mask = np.isin(t.domains, keep_dom)
            idx = np.flatnonzero(mask)[G.seeded_subsample(int(mask.sum()), int(a.umap_max_points), int(a.seed))]
            fig = f"umap_{name}.png"
            xy = G.umap_plot(emb[idx], t.domains[idx], DOMAINS, ctx.out_dir / fig,
                             f"UMAP of test embeddings, {name.replace('_', ' ')}\n{info.run_dir.name}",
                             int(a.seed), int(a.umap_neighbors))
            res["umap"][name] = {"sample_ids": t.sample_ids[idx].tolist(), "xy": [[round(v, 4) for v in p] for p in xy]}
            res["figures"].append(fig)
    return res


# --- representational similarity -----------------------------------------------------------------------------
def _cka(ctx: _Context) -> dict:
    from clipgen.analyze.activations import check_layers
    from clipgen.analyze.cka import cka_by_layer

    a, info, t = ctx.a, ctx.info, ctx.test
    acts = ctx.activations()
    layers = [n for n in ctx.layers() if n in set(check_layers(ctx.model[0].visual, list(a.layers)))]
    subsets = {k: v for k, v in _subsets(info).items() if v}
    res = {"layers": layers, "kernels": list(a.cka_kernels), "features": "per-channel mean over positions/tokens",
           "cka": cka_by_layer({n: acts[n] for n in layers}, t.domains, t.labels, DOMAINS, subsets,
                               len(info.classes), list(a.cka_kernels)),
           "subsets": {k: [info.classes[i] for i in v] for k, v in subsets.items()}, "figures": []}
    d = DOMAINS.index(info.meta["test_domain"])
    for kernel, by_subset in res["cka"].items():
        for subset, by_layer in by_subset.items():
            series = {f"{DOMAINS[d]} vs {DOMAINS[o]}": [by_layer[n][d][o] for n in layers]
                      for o in range(len(DOMAINS)) if o != d}
            fig = f"cka_{kernel}_{subset}.png"
            plots.lines(layers, series, ctx.out_dir / fig, f"{kernel} CKA per layer, {subset} classes "
                        f"\n{info.run_dir.name}", "CKA")
            res["figures"].append(fig)
    return res


# --- circuits ------------------------------------------------------------------------------------------------
def _circuits(ctx: _Context) -> dict:
    import torch

    from clipgen.analyze.activations import stages
    from clipgen.analyze.circuits import analyse_circuits, domain_jaccard, true_class_logit

    a, info, t = ctx.a, ctx.info, ctx.test
    cls_idx = info.heldout_idx if a.circuit_classes == "heldout" else list(range(len(info.classes)))
    sel = np.flatnonzero(np.isin(t.labels, cls_idx) & (t.rank < int(a.circuit_images_per_group)))
    t.decode(ctx.image_px)
    model = ctx.model[0]
    class_emb, scale = ctx.head()
    groups = np.array([f"{dom}|{lab}" for dom, lab in zip(t.domains[sel], t.labels[sel])])
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to activations only
    with torch.enable_grad():
        res = analyse_circuits(stages(model.visual), t.images[sel], t.labels[sel], groups,
                               true_class_logit(class_emb.detach(), scale), int(a.circuit_steps),
                               float(a.circuit_top_frac), int(a.circuit_top_edges), int(a.circuit_max_batch_elems),
                               ctx.device)
    layers = res["layers"]
    res["circuit_classes"] = [info.classes[i] for i in cls_idx]
    res["node_jaccard"] = domain_jaccard(res["groups"], layers, DOMAINS, cls_idx, "nodes")
    res["circuit_jaccard"] = domain_jaccard(res["groups"], layers[1:], DOMAINS, cls_idx, "edges")
    res["group_ids"] = "{domain}|{class index}"
    d = DOMAINS.index(info.meta["test_domain"])
    res["figures"] = []
    for what, lay in (("node_jaccard", layers), ("circuit_jaccard", layers[1:])):
        series = {f"{DOMAINS[d]} vs {DOMAINS[o]}": [res[what][n][d][o] for n in lay]
                  for o in range(len(DOMAINS)) if o != d}
        fig = f"circuits_{what}.png"
        plots.lines(lay, series, ctx.out_dir / fig, f"{what.replace('_', ' ')} per layer, "
                    f"{a.circuit_classes} classes\n{info.run_dir.name}", "Jaccard", (0, 1.02))
        res["figures"].append(fig)
    return res


def _jm(m) -> list:
    m = np.asarray(m, dtype=np.float64)
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in m]
