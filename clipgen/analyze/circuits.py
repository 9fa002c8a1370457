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
    gaps = []  # completeness: |sum of attributions - (M(x) - M(0))| per image and layer
    for start in range(0, n_img, chunk):
        idx = np.arange(start, min(n_img, start + chunk))
        attrs, full, zeros = node_attributions(stage_list, batch_images(idx), labels_t[idx].to(device), metric, steps)
        for li, at in enumerate(attrs):
            np.add.at(sums[li], gindex[idx], at.cpu().double().numpy())
            gaps.append((at.sum(dim=1) - (full - zeros[li])).abs().cpu().numpy())
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
    gaps_all = np.concatenate(gaps) if gaps else np.zeros(0)
    return {"layers": names, "groups": out_groups,
            "completeness": {"max_abs_gap": float(gaps_all.max()) if gaps_all.size else 0.0,
                             "mean_abs_gap": float(gaps_all.mean()) if gaps_all.size else 0.0},
            "images": int(n_img)}


def domain_jaccard(groups: dict, layers: Sequence[str], domain_list: Sequence[str], class_ids: Sequence[int],
                   what: str) -> dict[str, list]:
    """``{layer: [D, D]}``: Jaccard of kept nodes (``what="nodes"``) or circuit edges (``"edges"``) between the
    same class in two domains, averaged over ``class_ids`` where both groups exist. Group ids are
    ``"{domain}|{class}"``."""
    out = {}
    for layer in layers:
        n = len(domain_list)
        m = np.full((n, n), np.nan)
        for a in range(n):
            for b in range(n):
                vals = []
                for c in class_ids:
                    ga, gb = groups.get(f"{domain_list[a]}|{c}"), groups.get(f"{domain_list[b]}|{c}")
                    if ga is None or gb is None or layer not in ga[what]:
                        continue
                    sa = {tuple(e) if isinstance(e, list) else e for e in ga[what][layer]}
                    sb = {tuple(e) if isinstance(e, list) else e for e in gb[what][layer]}
                    v = jaccard(sa, sb)
                    if np.isfinite(v):
                        vals.append(v)
                if vals:
                    m[a, b] = float(np.mean(vals))
        out[layer] = [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in m]
    return out
