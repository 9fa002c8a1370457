"""Generator 2, discordance clustering: cluster the discovery images on which the runs disagree, then compile
every cluster into the slice that describes it best.

Discordant = the runs differ in correctness, or in true-class probability by more than tau. Features per image:
both runs' embeddings, each reduced by a PCA fitted on the discordant set (``pca_dim`` components, whitened
scale), plus metadata one-hots (domain; combination exposure) and the signed verdicts, weighted so that metadata
and direction matter as much as a few embedding components. At most ``max_points`` images are clustered (a
seeded subsample), so the cost does not grow with the evaluation set. ``sklearn.cluster.HDBSCAN`` finds the
clusters; noise points are dropped.

Compilation: for every cluster, the slice (over all slice types) with the highest Jaccard index between the
cluster and the slice's clustered images; the behaviour is whichever of correct / true_prob has the larger net
count in the cluster, the direction its majority side. Compiled hypotheses whose slice shows no significant
difference on discovery (exact McNemar, Benjamini-Hochberg over the clusters at ``fdr_q``) are dropped.
"""
from __future__ import annotations

import numpy as np

from clipgen.diff.generators.slice_diff import GroupIndex
from clipgen.diff.metrics import benjamini_hochberg, mcnemar_exact, mcnemar_z
from clipgen.diff.predicates import BehaviourParams, Codes, behaviour_side


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    """Top-k principal components, scaled so the first has unit standard deviation. Eigen-decomposes the
    d x d covariance (d = embedding width), which is far cheaper than an SVD of n x d when n >> k."""
    x = x.astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    k = max(1, min(k, x.shape[1], x.shape[0] - 1))
    evals, evecs = np.linalg.eigh(x.T @ x)  # ascending
    top = evecs[:, ::-1][:, :k]
    top *= np.where(top[np.abs(top).argmax(axis=0), np.arange(k)] < 0, -1.0, 1.0)  # deterministic signs
    z = x @ top
    return (z / (np.sqrt(max(evals[-1], 0.0) / max(len(x) - 1, 1)) + 1e-8)).astype(np.float32)


def generate(codes: Codes, verify_mask: np.ndarray, params: BehaviourParams, *, seed: int = 0,
             max_points: int = 4000, pca_dim: int = 8, min_cluster_size: int = 0, min_slice: int = 10,
             max_hypotheses: int = 50, fdr_q: float = 0.05, index: GroupIndex | None = None) -> list[dict]:
    from sklearn.cluster import HDBSCAN

    recs = codes.recs
    disc = ~verify_mask
    s_corr = behaviour_side(recs, "correct", None, params)
    s_prob = behaviour_side(recs, "true_prob", None, params)
    pool = np.flatnonzero(disc & ((s_corr != 0) | (s_prob != 0)))
    if len(pool) < 10:
        return []
    rng = np.random.default_rng(seed)
    if len(pool) > max_points:
        pool = np.sort(rng.choice(pool, size=max_points, replace=False))
    feats = [_pca(recs.emb_a[pool], pca_dim), _pca(recs.emb_b[pool], pca_dim)]
    for attr in ("domain", "combo"):
        n_vals = len(codes.names[attr])
        feats.append(np.eye(n_vals, dtype=np.float32)[codes.arrays[attr][pool]] * 2.0)
    feats.append(np.stack([s_corr[pool], s_prob[pool]], axis=1).astype(np.float32) * 2.0)
    x = np.concatenate(feats, axis=1)
    mcs = min_cluster_size or max(10, len(pool) // 40)
    labels = HDBSCAN(min_cluster_size=mcs, min_samples=5, copy=True).fit_predict(x)

    groups = [pool[labels == lab] for lab in sorted(set(labels.tolist()) - {-1})]
    return compile_groups(codes, verify_mask, params, pool, groups, "cluster", min_slice=min_slice,
                          max_hypotheses=max_hypotheses, fdr_q=fdr_q, index=index)


def compile_groups(codes: Codes, verify_mask: np.ndarray, params: BehaviourParams, pool: np.ndarray,
                   groups: list[np.ndarray], generator: str, *, min_slice: int = 10, max_hypotheses: int = 50,
                   fdr_q: float = 0.05, index: GroupIndex | None = None,
                   info: list[dict] | None = None) -> list[dict]:
    """Hypotheses from groups of discovery images (the clusters, or the images an SAE latent fires on): each
    group's best slice by Jaccard against the pool, its net behaviour (correct / true_prob) and majority side,
    then BH at ``fdr_q`` over the groups' exact McNemar p-values on their slices; z is signed toward the predicted
    side. ``info[i]`` (optional) is merged into group i's hypothesis (its provenance); a group whose slice,
    behaviour and direction an earlier group already gave is left out (groups come strongest first)."""
    recs = codes.recs
    disc = ~verify_mask
    s_corr = behaviour_side(recs, "correct", None, params)
    s_prob = behaviour_side(recs, "true_prob", None, params)
    ix = index or GroupIndex(codes)
    n_disc = {t: np.bincount(ix.gid[t][disc], minlength=ix.size[t]) for t in ix.types}
    in_pool = {t: np.bincount(ix.gid[t][pool], minlength=ix.size[t]) for t in ix.types}
    out, seen = [], set()
    for gi, members in enumerate(groups):
        best = (-1.0, None, None)
        for t in ix.types:
            inter = np.bincount(ix.gid[t][members], minlength=ix.size[t])
            jac = inter / np.maximum(len(members) + in_pool[t] - inter, 1)
            jac[n_disc[t] < min_slice] = -1.0
            g = int(np.argmax(jac))
            if jac[g] > best[0] + 1e-12:
                best = (float(jac[g]), t, g)
        if best[1] is None or best[0] <= 0:
            continue
        sl = ix.slice_of(best[1], best[2])
        nets = {b: int(s[members].sum()) for b, s in (("correct", s_corr), ("true_prob", s_prob))}
        beh = max(nets, key=lambda b: (abs(nets[b]), b == "correct"))
        if nets[beh] == 0:
            continue
        direction = "B" if nets[beh] > 0 else "A"
        key = (tuple(sorted(sl.items())), beh, direction)
        if key in seen:
            continue
        seen.add(key)
        m = codes.mask(sl) & disc
        side = s_corr if beh == "correct" else s_prob
        na, nb = int((side[m] == -1).sum()), int((side[m] == 1).sum())
        out.append({"generator": generator, "slice": sl, "behaviour": beh, "target": None, "direction": direction,
                    # z is signed toward the predicted direction: a group's majority can oppose its slice's
                    "p_value": float(mcnemar_exact(na, nb)),
                    "z": float(mcnemar_z(na, nb)) * (1 if direction == "B" else -1),
                    "group_size": int(len(members)), "group_jaccard": round(best[0], 4),
                    **(info[gi] if info is not None else {})})
    if out:  # a group that compiles to a slice without a significant difference is noise
        q = benjamini_hochberg([h["p_value"] for h in out])
        for h, qv in zip(out, q):
            h["q_value"] = float(qv)
        out = [h for h in out if h["q_value"] <= fdr_q and h["z"] > 0]
    out.sort(key=lambda h: (-h["z"], str(h["slice"]), h["behaviour"]))
    return out[:max_hypotheses]
