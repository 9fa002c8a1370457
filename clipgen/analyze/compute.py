"""The four analyses of one checkpoint (protocol §7), each ``ctx -> result dict`` (JSON-ready, no figures: those
are drawn from the result by clipgen.analyze.draw). ``ctx`` is clipgen.analyze.run.Context.

Every similarity between domains comes with a floor computed the same way between DIFFERENT classes of the two
domains (what the measure gives when nothing class-specific is shared), so a value can be read as "shared beyond
the floor"; circuits also record the chance level of node Jaccard for the layer's size.
"""
from __future__ import annotations

import numpy as np

from clipgen.facts import DOMAINS, DOMAIN_TERMS, NATURAL_DOMAIN


def subsets(info) -> dict[str, list[int]]:
    return {"all": list(range(len(info.classes))), "heldout": info.heldout_idx, "other": info.other_idx}


def jm(m) -> list:
    m = np.asarray(m, dtype=np.float64)
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in m]


# --- SAE feature sharing -------------------------------------------------------------------------------------
def sae(ctx) -> dict:
    from clipgen.analyze import sharing
    from clipgen.analyze.data import select_images
    from clipgen.analyze.sae import encode, train_sae

    a, info = ctx.a, ctx.info
    test_emb = ctx.embeddings()
    if a.sae_fit_split == "train":
        fit_emb = ctx.embeddings(select_images(info, "train", int(a.sae_fit_per_group), int(a.seed)))
    else:
        fit_emb = test_emb
    dim = test_emb.shape[1]
    model, summary = train_sae(fit_emb, int(a.sae_expansion) * dim, int(a.sae_steps), int(a.sae_batch_size),
                               float(a.sae_lr), float(a.sae_l1), int(a.seed), ctx.device)
    codes = encode(model, test_emb)
    d = info.meta["test_domain"]
    res = {"sae": summary, "fit_split": str(a.sae_fit_split), "fit_images": int(len(fit_emb)), "ks": list(a.sae_ks),
           "top_active": int(a.sae_top_active), "test_active": _active_counts(codes), "subsets": {}}
    for subset, idx in subsets(info).items():
        if subset == "all" or not idx:
            continue
        hist, counts = sharing.histograms(codes, ctx.test.domains, ctx.test.labels, DOMAINS, idx,
                                          int(a.sae_top_active))
        mat = sharing.share_matrix(hist, counts, list(a.sae_ks))
        floor = sharing.share_matrix(hist, counts, list(a.sae_ks), mismatched=True)
        scores, floor_scores = sharing.domain_scores(mat, DOMAINS), sharing.domain_scores(floor, DOMAINS)
        res["subsets"][subset] = {"classes": [info.classes[i] for i in idx], "matrix": jm(mat),
                                  "domain_scores": scores, "test_domain_score": scores[d],
                                  "floor_matrix": jm(floor), "floor_domain_scores": floor_scores,
                                  "test_domain_floor": floor_scores[d], "images": counts.tolist()}
        if subset == "heldout":
            res["top_features"] = _top_features(hist, int(a.sae_named_features))
    res.update(_concepts(ctx, model, res.get("top_features", {})))
    res["test_domain_score"] = res["subsets"].get("heldout", {}).get("test_domain_score")
    return res


def _active_counts(codes: np.ndarray) -> dict:
    """How many SAE features each test image activates: with fewer than ``top_active`` active features the
    histograms count every active feature, not a top-N cut."""
    l0 = (np.asarray(codes) > 0).sum(axis=1)
    return {"mean": float(l0.mean()) if l0.size else 0.0, "median": float(np.median(l0)) if l0.size else 0.0,
            "max": int(l0.max()) if l0.size else 0}


def _top_features(hist: np.ndarray, n: int) -> dict:
    top = {}
    for di, dom in enumerate(DOMAINS):
        tot = hist[:, di].sum(axis=0)
        order = np.argsort(-tot, kind="stable")[:n]
        top[dom] = [int(f) for f in order if tot[f] > 0]
    return top


def _concepts(ctx, model, top: dict) -> dict:
    import torch

    from clipgen.analyze import sharing
    from clipgen.facts import zeroshot_templates
    from clipgen.models.zeroshot import class_embeddings

    a, info = ctx.a, ctx.info
    vocab = (sharing.read_vocab(a.sae_vocab_file) if a.sae_vocab_file else
             list(dict.fromkeys(info.classes + [t for pair in DOMAIN_TERMS.values() for t in pair])))
    out = {"vocabulary": {"source": str(a.sae_vocab_file) if a.sae_vocab_file else "run classes + domain words",
                          "size": len(vocab)}}
    feats = sorted({f for fs in top.values() for f in fs})
    if feats:
        clip, tok = ctx.model
        with torch.no_grad():
            txt = class_embeddings(clip, tok, vocab, list(zeroshot_templates(ctx.cfg.eval.templates)),
                                   ctx.device).cpu().numpy()
        names = sharing.concept_names(model.w_dec.detach().numpy(), txt, vocab, feats)
        out["concepts"] = {str(k): v for k, v in names.items()}
    return out


# --- embedding geometry --------------------------------------------------------------------------------------
def geometry(ctx) -> dict:
    from clipgen.analyze import geometry as G
    from clipgen.analyze.data import compare_with_eval

    a, info, t = ctx.a, ctx.info, ctx.test
    emb = ctx.embeddings()
    res = {"images": int(len(emb)), "eval_check": compare_with_eval(info, t.sample_ids, emb),
           "domain_mean_distance": jm(G.domain_mean_distances(emb, t.domains, DOMAINS)),
           "class_conditional_distance": {}, "class_conditional_distance_floor": {}}
    for subset, idx in subsets(info).items():
        if idx:
            res["class_conditional_distance"][subset] = jm(
                G.class_conditional_distances(emb, t.domains, t.labels, DOMAINS, idx))
            res["class_conditional_distance_floor"][subset] = jm(
                G.class_conditional_distances(emb, t.domains, t.labels, DOMAINS, idx, mismatched=True))
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
            xy = G.umap_embed(emb[idx], int(a.seed), int(a.umap_neighbors))
            res["umap"][name] = {"sample_ids": t.sample_ids[idx].tolist(), "domains": t.domains[idx].tolist(),
                                 "xy": [[round(float(v), 4) for v in p] for p in xy]}
    return res


# --- representational similarity -----------------------------------------------------------------------------
def cka(ctx) -> dict:
    from clipgen.analyze.activations import check_layers
    from clipgen.analyze.cka import cka_by_layer

    a, info, t = ctx.a, ctx.info, ctx.test
    acts = ctx.activations()
    layers = [n for n in ctx.layers() if n in set(check_layers(ctx.model[0].visual, list(a.layers)))]
    subs = {k: v for k, v in subsets(info).items() if v}
    d = DOMAINS.index(info.meta["test_domain"])
    values, floors = cka_by_layer({n: acts[n] for n in layers}, t.domains, t.labels, DOMAINS, subs,
                                  len(info.classes), list(a.cka_kernels), floor_row=d)
    return {"layers": layers, "kernels": list(a.cka_kernels), "features": "per-channel mean over positions/tokens",
            "cka": values, "floor": floors, "floor_method": "classes mismatched by every cyclic shift",
            "subsets": {k: [info.classes[i] for i in v] for k, v in subs.items()}}


# --- circuits ------------------------------------------------------------------------------------------------
def circuits(ctx) -> dict:
    import math

    import torch

    from clipgen.analyze import circuits as C
    from clipgen.analyze.activations import stages

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
        res = C.analyse_circuits(stages(model.visual), t.images[sel], t.labels[sel], groups,
                                 C.true_class_logit(class_emb.detach(), scale), int(a.circuit_steps),
                                 float(a.circuit_top_frac), int(a.circuit_top_edges), int(a.circuit_max_batch_elems),
                                 ctx.device)
    layers = res["layers"]
    res["circuit_classes"] = [info.classes[i] for i in cls_idx]
    for what, lay, name in (("nodes", layers, "node_jaccard"), ("edges", layers[1:], "circuit_jaccard")):
        res[name] = C.domain_jaccard(res["groups"], lay, DOMAINS, cls_idx, what)
        res[f"{name}_floor"] = C.domain_jaccard(res["groups"], lay, DOMAINS, cls_idx, what, mismatched=True)
    res["node_jaccard_chance"] = {n: round(C.jaccard_chance(c, math.ceil(float(a.circuit_top_frac) * c)), 6)
                                  for n, c in res["channels"].items()}
    res["whole_circuit"] = C.whole_circuit_similarities(res["groups"], layers, DOMAINS, cls_idx,
                                                        int(a.circuit_wl_iterations))
    res["group_ids"] = "{domain}|{class index}"
    return res


COMPUTE = {"sae": sae, "geometry": geometry, "cka": cka, "circuits": circuits}
