"""Figures of the analyses (matplotlib Agg, written atomically as PNG)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from clipgen.files import atomic_write_bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def heatmap(matrix, labels: Sequence[str], path: Path, title: str, fmt: str = "{:.2f}") -> None:
    plt = _plt()
    m = np.array([[_num(v) for v in row] for row in matrix], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(0.75 * len(labels) + 2.2, 0.65 * len(labels) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    lo, hi = im.get_clim()
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                bright = hi > lo and (m[i, j] - lo) / (hi - lo) > 0.6  # viridis turns yellow: dark text there
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7, color="k" if bright else "w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def lines(xlabels: Sequence[str], series: dict[str, Sequence], path: Path, title: str, ylabel: str,
          ylim: tuple[float, float] | None = None) -> None:
    """One line per series over the ``xlabels`` (layers); None values are gaps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(xlabels) + 2.5), 3.6))
    x = np.arange(len(xlabels))
    for name, ys in series.items():
        ax.plot(x, [_num(v) for v in ys], marker="o", ms=3, label=name)
    ax.set_xticks(x, xlabels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def bars(labels: Sequence[str], values: Sequence, path: Path, title: str, ylabel: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2), 3.4))
    ax.bar(range(len(labels)), [_num(v) for v in values], color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def scatter(xy: np.ndarray, groups: np.ndarray, group_list: Sequence[str], path: Path, title: str) -> None:
    """2-d points coloured by group (UMAP of embeddings by domain), no axes ticks (UMAP axes mean nothing)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab10")
    for i, g in enumerate(group_list):
        m = groups == g
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(i), label=g)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2, fontsize=7, loc="best")
    _save(fig, path)


def errorbar_lines(xlabels: Sequence[str], series: dict[str, Sequence], path: Path, title: str,
                   ylabel: str) -> None:
    """One line per series over the ``xlabels``, each point ``(value, low, high)`` with its interval as an error
    bar (None: no point); series are offset a little sideways so their bars do not hide each other."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(xlabels) + 3.0) + 2.2, 4.0))
    x = np.arange(len(xlabels), dtype=np.float64)
    width = 0.5 / max(1, len(series))
    for i, (name, pts) in enumerate(series.items()):
        v = np.array([_num(p[0]) for p in pts])
        lo = np.array([_num(p[1]) for p in pts])
        hi = np.array([_num(p[2]) for p in pts])
        err = np.vstack([np.where(np.isfinite(lo), v - lo, 0), np.where(np.isfinite(hi), hi - v, 0)])
        ax.errorbar(x + (i - (len(series) - 1) / 2) * width, v, yerr=np.abs(err), marker="o", ms=4, capsize=2,
                    label=name)
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, xlabels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: it hid the last layer
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def recipe_scatter(x: Sequence[float], y: Sequence[float], groups: Sequence[str], labels: Sequence, path: Path,
                   title: str, xlabel: str, ylabel: str) -> None:
    """One point per run, coloured by its group (recipe), labelled with ``labels`` (seed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    cmap = plt.get_cmap("tab10")
    groups = list(groups)
    for i, g in enumerate(dict.fromkeys(groups)):
        idx = [k for k, h in enumerate(groups) if h == g]
        ax.scatter([x[k] for k in idx], [y[k] for k in idx], s=28, color=cmap(i), label=g)
        for k in idx:
            ax.annotate(str(labels[k]), (x[k], y[k]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    _save(fig, path)
