"""Circuits (protocol §7): integrated-gradient node and edge attributions in the visual tower, kept nodes, circuits,
and their Jaccard similarity between domains.

- Metric: the zero-shot classifier's true-class logit, logit_scale * cos(embedding, class_embedding[label]), with
  the embedding's norm held at the image's own value along the integration path (see :func:`true_class_logit`).
- Node attribution of channel i of layer l: integrated gradients on the layer's activation a_l with a zero
  baseline, IG_i = sum over positions of a_l * mean_k dM/da_l(alpha_k a_l), alpha_k the midpoints of ``steps``
  equal intervals (paper: 10); the tower is run on from layer l (clipgen.analyze.activations.stages). By
  completeness, sum_i IG_i = M(a_l) - M(0) up to the Riemann error.
- Kept nodes of a (class, domain): the top ``top_frac`` channels of each layer by |mean attribution| over its
  images.
- Edges only between consecutive layers (l-1 -> l; nothing wraps from the last layer to the first): weight of
  i -> j = IG of the upstream activation a_{l-1} on the downstream node value (channel j of layer l summed over
  positions), zero baseline, averaged over the images; edges join kept nodes.
- Circuit: every kept node's ``top_edges`` incoming edges by |weight| (never by signed weight).
- Images of every group are processed together in large batches (chunked by a memory budget), and per-image
  attributions are averaged per group afterwards.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def run_from(stage_list: Sequence[Stage], start: int, x: torch.Tensor) -> torch.Tensor:
    """Apply stages ``start..end`` to ``x`` (the output of stage ``start - 1``, or the image for 0)."""
    for _, fn in stage_list[start:]:
        x = fn(x)
    return x


def true_class_logit(class_emb: torch.Tensor, scale: float):
    """M(embedding, labels, ref_norm) = scale * <embedding, class_emb[labels]> / ref_norm, one value per row.

    ``ref_norm`` is the norm of the image's own (clean) embedding, held fixed along the integration path, so M
    equals the zero-shot true-class logit scale * cos(...) at the image itself. Normalising inside the path
    instead would make M constant along a ray to the zero baseline of the last layer (cosine ignores scale) and
    jump at 0, which breaks completeness there."""
    def metric(emb: torch.Tensor, labels: torch.Tensor, ref_norm: torch.Tensor) -> torch.Tensor:
        return scale * (emb * class_emb[labels]).sum(dim=-1) / ref_norm.clamp_min(1e-12)
    return metric


def _midpoints(steps: int) -> torch.Tensor:
    return (torch.arange(steps, dtype=torch.float32) + 0.5) / steps


def _channels_sum(t: torch.Tensor) -> torch.Tensor:
    """[batch, channels] from a full activation: sum over positions (conv) or tokens (batch-first blocks)."""
    if t.dim() == 4:
        return t.sum(dim=(2, 3))
    if t.dim() == 3:
        return t.sum(dim=1)
    return t


@torch.no_grad()
def forward_all(stage_list: Sequence[Stage], x: torch.Tensor) -> list[torch.Tensor]:
    acts = []
    for _, fn in stage_list:
        x = fn(x)
        acts.append(x)
    return acts


def node_attributions(stage_list: Sequence[Stage], images: torch.Tensor, labels: torch.Tensor, metric,
                      steps: int = 10) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """IG of every channel of every layer for every image: ``(attrs, M(x), M(zero at layer))`` where ``attrs[l]``
    is ``[batch, channels_l]`` and ``M(zero at layer)[l]`` is the metric with layer l's activation zeroed."""
    acts = forward_all(stage_list, images)
    ref = acts[-1].norm(dim=-1)
    with torch.no_grad():
        full = metric(acts[-1], labels, ref)
    alphas = _midpoints(steps).to(images.device)
    attrs, zero_vals = [], []
    for li, a in enumerate(acts):
        b = a.shape[0]
        shape = (steps,) + (1,) * a.dim()
        z = (alphas.view(shape) * a.unsqueeze(0)).reshape((steps * b,) + a.shape[1:]).detach().requires_grad_(True)
        out = run_from(stage_list, li + 1, z)
        m = metric(out, labels.repeat(steps), ref.repeat(steps))
        (grad,) = torch.autograd.grad(m.sum(), z)
        g = grad.reshape((steps, b) + a.shape[1:]).mean(dim=0)
        attrs.append(_channels_sum(a * g).detach())
        with torch.no_grad():
            zero_vals.append(metric(run_from(stage_list, li + 1, torch.zeros_like(a)), labels, ref))
    return attrs, full, zero_vals


def edge_attributions(stage_list: Sequence[Stage], upstream: torch.Tensor, layer: int, targets: torch.Tensor,
                      steps: int = 10) -> torch.Tensor:
    """``[batch, K, channels_{layer-1}]``: IG of the upstream activation (layer - 1, zero baseline) on target
    channels of ``layer`` (summed over positions). ``targets [batch, K]`` gives each image its own K target
    channels (its group's kept nodes), so images of many groups share one forward pass and K backward passes.
    ``layer`` >= 1: edges join consecutive layers and nothing feeds the first one."""
    if layer < 1:
        raise ValueError("edges join consecutive layers l-1 -> l with l >= 1; nothing feeds the first layer")
    fn = stage_list[layer][1]
    a = upstream
    b, k = targets.shape
    alphas = _midpoints(steps).to(a.device)
    shape = (steps,) + (1,) * a.dim()
    z = (alphas.view(shape) * a.unsqueeze(0)).reshape((steps * b,) + a.shape[1:]).detach().requires_grad_(True)
    s = _channels_sum(fn(z))  # [steps*b, C_down]
    rows = torch.arange(steps * b, device=s.device)
    tgt = targets.to(s.device).repeat(steps, 1)  # row steps*i + img -> that image's targets
    out = []
    for r in range(k):
        (grad,) = torch.autograd.grad(s[rows, tgt[:, r]].sum(), z, retain_graph=r < k - 1)
        g = grad.reshape((steps, b) + a.shape[1:]).mean(dim=0)
        out.append(_channels_sum(a * g))
    return torch.stack(out, dim=1).detach()


def top_nodes(mean_attr: np.ndarray, top_frac: float) -> list[int]:
    """Indices of the ceil(top_frac * C) channels with the largest |attribution| (ties: lower index first)."""
    k = max(1, math.ceil(top_frac * len(mean_attr)))
    order = np.argsort(-np.abs(mean_attr), kind="stable")[:k]
    return sorted(int(i) for i in order)


def circuit_edges(weights: np.ndarray, up_nodes: Sequence[int], down_nodes: Sequence[int],
                  top_edges: int = 3) -> list[tuple[int, int]]:
    """For each kept downstream node j, its ``top_edges`` incoming edges (i, j) from kept upstream nodes i with
    the largest |weight| (``weights [len(down_nodes), C_up]``, row r = down_nodes[r])."""
    up = np.asarray(list(up_nodes), dtype=np.int64)
    edges = []
    for r, j in enumerate(down_nodes):
        w = np.abs(np.asarray(weights[r])[up])
        for pos in np.argsort(-w, kind="stable")[:top_edges]:
            edges.append((int(up[pos]), int(j)))
    return sorted(edges)


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    if not a and not b:
        return float("nan")
    return len(a & b) / len(a | b)


def analyse_circuits(stage_list: Sequence[Stage], images: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                     metric, steps: int = 10, top_frac: float = 0.1, top_edges: int = 3,
                     max_batch_elems: int = 20_000_000, device: str | torch.device = "cpu") -> dict:
    """Nodes and circuits of every group (``groups``: one group id per image, e.g. class x domain).

    Returns ``{"layers", "groups": {gid: {"nodes": {layer: [...]}, "edges": {layer: [[i, j], ...]},
    "node_attr": {layer: [...]}}}, "completeness"}`` where ``edges[layer]`` are the circuit edges into that layer
    (from the layer before it)."""
    from clipgen.models.zeroshot import normalize_images

    names = [n for n, _ in stage_list]
    n_img = len(images)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def batch_images(idx):
        x = torch.from_numpy(np.ascontiguousarray(images[idx])).to(device)
        return normalize_images(x) if x.dtype == torch.uint8 else x.float()

    # Size chunks from the largest activation so steps x chunk x activation fits the budget.
    with torch.no_grad():
        probe = forward_all(stage_list, batch_images(np.arange(min(1, n_img))))
    per_img = max(int(np.prod(a.shape[1:])) for a in probe)
    chunk = max(1, int(max_batch_elems // (per_img * steps * 4)))

    uniq = list(dict.fromkeys(np.asarray(groups).tolist()))
    gindex = np.array([uniq.index(g) for g in np.asarray(groups).tolist()])
    channels = [_channels_sum(a).shape[1] for a in probe]
    sums = [np.zeros((len(uniq), c)) for c in channels]
    counts = np.bincount(gindex, minlength=len(uniq)).astype(np.float64)
    # completeness per layer: |sum of attributions - (M(x) - M(0))| and |M(x) - M(0)| per image
    gaps: list[list] = [[] for _ in names]
    spans: list[list] = [[] for _ in names]
    for start in range(0, n_img, chunk):
        idx = np.arange(start, min(n_img, start + chunk))
        attrs, full, zeros = node_attributions(stage_list, batch_images(idx), labels_t[idx].to(device), metric, steps)
        for li, at in enumerate(attrs):
            np.add.at(sums[li], gindex[idx], at.cpu().double().numpy())
            gaps[li].append((at.sum(dim=1) - (full - zeros[li])).abs().cpu().numpy())
            spans[li].append((full - zeros[li]).abs().cpu().numpy())
    mean_attr = [s / counts[:, None] for s in sums]
    nodes = [[top_nodes(mean_attr[li][g], top_frac) for li in range(len(names))] for g in range(len(uniq))]

    # Edges l-1 -> l for l = 1..L-1 only: each image's targets are its group's kept nodes of layer l.
    edge_w: list = [None]
    for li in range(1, len(names)):
        kept = torch.tensor([nodes[g][li] for g in range(len(uniq))], dtype=torch.long)  # [groups, K]
        acc = np.zeros((len(uniq), kept.shape[1], channels[li - 1]))
        up_elems = int(np.prod(probe[li - 1].shape[1:]))
        echunk = max(1, int(max_batch_elems // (up_elems * steps * 3)))
        for start in range(0, n_img, echunk):
            idx = np.arange(start, min(n_img, start + echunk))
            with torch.no_grad():
                up = run_from(stage_list[:li], 0, batch_images(idx))
            w = edge_attributions(stage_list, up, li, kept[gindex[idx]], steps)
            np.add.at(acc, gindex[idx], w.cpu().double().numpy())
        edge_w.append(acc / counts[:, None, None])

    out_groups = {}
    for g, gid in enumerate(uniq):
        rec = {"nodes": {}, "edges": {}, "node_attr": {}}
        for li, name in enumerate(names):
            rec["nodes"][name] = nodes[g][li]
            rec["node_attr"][name] = [round(float(v), 6) for v in mean_attr[li][g]]
            if li >= 1:
                rec["edges"][name] = [list(e) for e in circuit_edges(edge_w[li][g], nodes[g][li - 1],
                                                                     nodes[g][li], top_edges)]
        out_groups[str(gid)] = rec
    return {"layers": names, "groups": out_groups, "completeness": completeness(names, gaps, spans),
            "images": int(n_img), "channels": dict(zip(names, channels))}


def completeness(names: Sequence[str], gaps: list[list], spans: list[list]) -> dict:
    """How far the node attributions are from adding up to M(x) - M(0) (integrated gradients' completeness),
    overall and per layer: mean / max absolute gap in logits, and the mean gap relative to the mean |M(x) - M(0)|
    (the quantity the attributions share out), so a gap can be read against what it is a gap in."""
    per_layer, all_gaps = {}, []
    for name, g, s in zip(names, gaps, spans):
        g = np.concatenate(g) if g else np.zeros(0)
        s = np.concatenate(s) if s else np.zeros(0)
        all_gaps.append(g)
        span = float(s.mean()) if s.size else 0.0
        per_layer[name] = {"mean_abs_gap": float(g.mean()) if g.size else 0.0,
                           "max_abs_gap": float(g.max()) if g.size else 0.0, "mean_abs_change": span,
                           "relative_gap": float(g.mean()) / span if g.size and span > 0 else None}
    flat = np.concatenate(all_gaps) if all_gaps else np.zeros(0)
    rel = [v["relative_gap"] for v in per_layer.values() if v["relative_gap"] is not None]
    return {"max_abs_gap": float(flat.max()) if flat.size else 0.0,
            "mean_abs_gap": float(flat.mean()) if flat.size else 0.0,
            "max_relative_gap": max(rel) if rel else None, "per_layer": per_layer}


def _edge_set(edges) -> set:
    return {tuple(e) if isinstance(e, list) else e for e in edges}


def layer_jaccard(layer: str, what: str):
    """Similarity of two groups' records: Jaccard of their kept nodes (``what="nodes"``) or circuit edges
    (``"edges"``) at ``layer``; NaN when a group has no entry for the layer."""
    def sim(ga: dict, gb: dict) -> float:
        if layer not in ga[what] or layer not in gb[what]:
            return float("nan")
        return jaccard(_edge_set(ga[what][layer]), _edge_set(gb[what][layer]))
    return sim


def domain_matrix(groups: dict, domain_list: Sequence[str], class_ids: Sequence[int], sim,
                  mismatched: bool = False) -> np.ndarray:
    """``[D, D]``: ``sim`` between the groups ``"{domain}|{class}"`` of two domains, averaged over the classes
    where both exist: the same class in both (``mismatched=False``) or, as a floor, every ordered pair of
    different classes (``mismatched=True``: how alike two circuits are when nothing but the domains and the
    layer's size is shared)."""
    n = len(domain_list)
    m = np.full((n, n), np.nan)
    pairs = [(c, d) for c in class_ids for d in class_ids if (c != d) == mismatched]
    for a in range(n):
        for b in range(n):
            vals = []
            for c, d in pairs:
                ga, gb = groups.get(f"{domain_list[a]}|{c}"), groups.get(f"{domain_list[b]}|{d}")
                if ga is not None and gb is not None:
                    v = sim(ga, gb)
                    if np.isfinite(v):
                        vals.append(v)
            if vals:
                m[a, b] = float(np.mean(vals))
    return m


def domain_jaccard(groups: dict, layers: Sequence[str], domain_list: Sequence[str], class_ids: Sequence[int],
                   what: str, mismatched: bool = False) -> dict[str, list]:
    """``{layer: [D, D]}``: Jaccard of kept nodes (``what="nodes"``) or circuit edges (``"edges"``) between the
    same class in two domains (or, ``mismatched=True``, between different classes: the floor), averaged over
    ``class_ids`` where both groups exist. Group ids are ``"{domain}|{class}"``."""
    return {layer: _json(domain_matrix(groups, domain_list, class_ids, layer_jaccard(layer, what), mismatched))
            for layer in layers}


def jaccard_chance(channels: int, kept: int) -> float:
    """Expected Jaccard of two independent uniformly random ``kept``-subsets of ``channels`` channels: the
    intersection is hypergeometric, J = i / (2 kept - i)."""
    if kept <= 0 or channels <= 0:
        return float("nan")
    total = math.comb(channels, kept)
    return sum(math.comb(kept, i) * math.comb(channels - kept, kept - i) / total * i / (2 * kept - i)
               for i in range(max(0, 2 * kept - channels), kept + 1))


# --- whole circuits ------------------------------------------------------------------------------------------
def circuit_graph(rec: dict, layers: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """A group's circuit as one graph over all layers: nodes ``"{layer}:{channel}"`` (kept nodes), directed
    edges from the circuit edges between consecutive layers."""
    nodes = [f"{layer}:{c}" for layer in layers for c in rec["nodes"].get(layer, [])]
    edges = [(f"{layers[li - 1]}:{i}", f"{layer}:{j}") for li, layer in enumerate(layers) if li >= 1
             for i, j in rec["edges"].get(layer, [])]
    return nodes, edges


def wl_features(nodes: Sequence[str], edges: Sequence[tuple[str, str]], iterations: int = 2) -> dict:
    """Weisfeiler-Lehman subtree features of a directed, node-labelled graph: counts of (iteration, label) for
    iterations 0..``iterations`` (exactly that many refinements; the authors' "h2" ran three). A node's next label
    combines its label with the sorted labels of its in- and out-neighbours, so in later iterations two circuits
    share a feature only where a node AND its wiring coincide."""
    import hashlib

    labels = {v: v for v in nodes}
    ins: dict[str, list[str]] = {v: [] for v in nodes}
    outs: dict[str, list[str]] = {v: [] for v in nodes}
    for u, v in edges:
        if u in labels and v in labels:
            outs[u].append(v)
            ins[v].append(u)
    feats: dict = {}
    for it in range(iterations + 1):
        if it:
            labels = {v: hashlib.sha1(repr((labels[v], sorted(labels[u] for u in ins[v]),
                                            sorted(labels[w] for w in outs[v]))).encode()).hexdigest()[:16]
                      for v in nodes}
        for v in nodes:
            feats[(it, labels[v])] = feats.get((it, labels[v]), 0) + 1
    return feats


def wl_similarity(fa: dict, fb: dict) -> float:
    """Normalised WL subtree kernel k(a, b) / sqrt(k(a, a) k(b, b)) in [0, 1]; NaN for an empty circuit."""
    def dot(x, y):
        return float(sum(v * y.get(k, 0) for k, v in x.items()))
    norm = math.sqrt(dot(fa, fa) * dot(fb, fb))
    return dot(fa, fb) / norm if norm > 0 else float("nan")


def whole_circuit_similarities(groups: dict, layers: Sequence[str], domain_list: Sequence[str],
                               class_ids: Sequence[int], iterations: int = 2) -> dict:
    """Whole-circuit similarity between domains (same class; and the different-class floor): the normalised WL
    kernel of the circuit graphs, and the Jaccard of all kept nodes / all circuit edges over every layer."""
    feats, node_sets, edge_sets = {}, {}, {}
    for gid, rec in groups.items():
        nodes, edges = circuit_graph(rec, layers)
        feats[gid], node_sets[gid], edge_sets[gid] = wl_features(nodes, edges, iterations), set(nodes), set(edges)
    by_id = {id(rec): gid for gid, rec in groups.items()}
    sims = {"wl": lambda a, b: wl_similarity(feats[by_id[id(a)]], feats[by_id[id(b)]]),
            "node_jaccard": lambda a, b: jaccard(node_sets[by_id[id(a)]], node_sets[by_id[id(b)]]),
            "edge_jaccard": lambda a, b: jaccard(edge_sets[by_id[id(a)]], edge_sets[by_id[id(b)]])}
    out = {"wl_iterations": int(iterations)}
    for name, sim in sims.items():
        out[name] = _json(domain_matrix(groups, domain_list, class_ids, sim))
        out[f"{name}_floor"] = _json(domain_matrix(groups, domain_list, class_ids, sim, mismatched=True))
    return out


def _json(m: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in np.asarray(m)]
