"""Primitive shapes and the class identities of the synthetic world.

A world class is a fixed composition of 2-3 primitive shapes (which primitives, their sizes, aspect ratios,
orientations and relative positions). That composition is the *only* thing that identifies a class: colours,
textures and line styles belong to the domains (styles.py) and are re-drawn for every image, so a model has to
learn shape to classify. Every image then applies a random pose (position, scale, rotation, slight
deformation) on top of the fixed composition.

Everything is a simple closed polygon in "unit" coordinates (composition fits in [-1, 1]^2), so posing is one
affine map plus noise and every renderer (fills, outlines, hatching, brush strokes) works from the same data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from clipgen.errors import ClipgenError


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    pts = _regular(10, -math.pi / 2)
    pts[1::2] *= 0.45
    return pts


def _crescent() -> np.ndarray:
    # Outer arc through the left side of the unit circle, back along a shallower inner arc.
    t = np.linspace(math.pi / 3, 5 * math.pi / 3, 16)
    outer = np.stack([np.cos(t), np.sin(t)], axis=1)
    u = np.linspace(-math.pi / 2, math.pi / 2, 12)[1:-1]
    inner = np.stack([0.5 - 0.6 * np.cos(u), 0.866 * np.sin(u)], axis=1)
    return np.concatenate([outer, inner]) + [0.2, 0.0]


def _semicircle() -> np.ndarray:
    t = np.linspace(math.pi, 2 * math.pi, 13)  # the dome points up (image y grows downward)
    return np.stack([np.cos(t), np.sin(t) + 0.4], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 28, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    return (pts - pts.mean(0)) / 16.5


def _poly(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=float).reshape(-1, 2)


# Unit-size primitives (roughly radius 1 around the origin). Chosen to stay distinct when a part is only
# ~8 px wide at 32 px: round, angular, pointed, concave and elongated outlines.
PRIMITIVES: dict[str, np.ndarray] = {
    "circle": _regular(24),
    "square": _regular(4, math.pi / 4) * 1.1,
    "triangle": _regular(3, -math.pi / 2) * 1.1,
    "diamond": _regular(4) * [0.7, 1.1],
    "pentagon": _regular(5, -math.pi / 2),
    "hexagon": _regular(6),
    "star": _star() * 1.1,
    "cross": _poly(-.33, -1, .33, -1, .33, -.33, 1, -.33, 1, .33, .33, .33, .33, 1, -.33, 1, -.33, .33,
                   -1, .33, -1, -.33, -.33, -.33),
    "crescent": _crescent(),
    "semicircle": _semicircle(),
    "heart": _heart(),
    "arrow": _poly(-1, -.25, .2, -.25, .2, -.7, 1, 0, .2, .7, .2, .25, -1, .25),
    "trapezoid": _poly(-1, .6, 1, .6, .5, -.6, -.5, -.6),
    "bar": _poly(-1, -.28, 1, -.28, 1, .28, -1, .28),
    "ell": _poly(-.8, -1, -.2, -1, -.2, .4, .8, .4, .8, 1, -.8, 1),
    "drop": np.concatenate([_regular(18, 0)[:10] * 0.75 + [0, 0.25], _poly(0, -1)]),
}
# Primitives that look the same after a quarter turn or less do not need a random orientation.
_ROUND = {"circle"}


@dataclass(frozen=True)
class Part:
    primitive: str
    center: tuple[float, float]  # in unit coordinates of the composition
    verts: np.ndarray  # (n, 2) polygon in unit coordinates (already placed)


@dataclass(frozen=True)
class ClassShape:
    name: str
    parts: tuple[Part, ...]

    def signature(self) -> tuple[str, ...]:
        return tuple(sorted(p.primitive for p in self.parts))


def _place(prim: str, center, size: float, aspect: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return (PRIMITIVES[prim] * [aspect, 1.0]) @ rot.T * size + np.asarray(center)


def _random_composition(name: str, rng: np.random.Generator) -> ClassShape | None:
    names = sorted(PRIMITIVES)
    n_parts = int(rng.choice([2, 3]))
    prims = [str(p) for p in rng.choice(names, size=n_parts, replace=False)]
    placed: list[tuple[str, np.ndarray, float, np.ndarray]] = []  # (prim, center, size, verts)
    for k, prim in enumerate(prims):
        size = 1.0 if k == 0 else float(rng.uniform(0.5, 0.85))
        aspect = 1.0 if prim in _ROUND and rng.random() < 0.5 else float(rng.uniform(0.7, 1.3))
        angle = float(rng.choice([0.0, 0.5, 1.0, 1.5]) * math.pi + rng.normal(0, 0.2))
        if k == 0:
            center = np.zeros(2)
        else:
            # Attach to an earlier part so the object reads as one connected thing with a clear layout.
            anchor = placed[int(rng.integers(len(placed)))]
            theta = rng.uniform(0, 2 * math.pi)
            dist = (anchor[2] + size) * rng.uniform(0.55, 0.9)
            center = anchor[1] + dist * np.array([math.cos(theta), math.sin(theta)])
        placed.append((prim, center, size, _place(prim, center, size, aspect, angle)))
    allv = np.concatenate([p[3] for p in placed])
    lo, hi = allv.min(0), allv.max(0)
    extent = hi - lo
    if extent.min() / extent.max() < 0.45:
        return None  # too elongated: it would be a thin sliver at 32 px
    mid, half = (lo + hi) / 2, extent.max() / 2
    parts = tuple(Part(p, tuple(((c - mid) / half).tolist()), (v - mid) / half) for p, c, s, v in placed)
    if min(s / half for _, _, s, _ in placed) < 0.28:
        return None  # a part this small vanishes after downsampling
    return ClassShape(name, parts)


def silhouette(shape: ClassShape, px: int = 32, margin: float = 0.1) -> np.ndarray:
    """Boolean mask of the canonical (unposed) composition, filling the frame up to ``margin``."""
    img = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(img)
    half = px * (0.5 - margin)
    for part in shape.parts:
        draw.polygon((part.verts * half + px / 2).ravel().tolist(), fill=255)
    return np.asarray(img) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1.0, float((a | b).sum()))


def make_class_shapes(names: list[str], seed: int, max_iou: float = 0.7,
                      max_tries: int = 400) -> dict[str, ClassShape]:
    """One composition per class name, drawn in the given order from ``seed``.

    A candidate is rejected as a near-duplicate when its silhouette overlaps an accepted one by IoU above
    ``max_iou`` (also under a few small rotations, because images are rotated by up to ~20 degrees), or when
    it uses the same primitives as an accepted one and overlaps it by more than half. The rng of each class
    is keyed by its position, so a class's identity depends only on the seed and the classes before it.
    """
    accepted: dict[str, ClassShape] = {}
    masks: list[tuple[tuple[str, ...], np.ndarray]] = []
    for idx, name in enumerate(names):
        rng = np.random.default_rng([seed, 7919, idx])
        for _ in range(max_tries):
            cand = _random_composition(name, rng)
            if cand is None:
                continue
            m = silhouette(cand)
            rotated = [silhouette(rotate(cand, a)) for a in (-0.3, 0.3)]
            clash = False
            for sig, m0 in masks:
                iou = max(_iou(m0, r) for r in [m, *rotated])
                if iou > max_iou or (sig == cand.signature() and iou > 0.5):
                    clash = True
                    break
            if not clash:
                accepted[name] = cand
                masks.append((cand.signature(), m))
                break
        else:  # pragma: no cover - 345 classes (all of DomainNet) still fit easily
            raise ClipgenError(f"no distinct shape left for class {name!r} after {max_tries} tries: expected fewer "
                               f"world.num_classes + world.num_distractors than {len(names)}")
    return accepted


def rotate(shape: ClassShape, angle: float) -> ClassShape:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return ClassShape(shape.name, tuple(Part(p.primitive, p.center, p.verts @ rot.T) for p in shape.parts))


def pose(shape: ClassShape, rng: np.random.Generator, center: tuple[float, float], half: float,
         rot_deg: float = 20.0, part_jitter: float = 0.05, stretch: float = 0.1,
         vertex_jitter: float = 0.0) -> list[np.ndarray]:
    """Polygons of one posed instance in pixel coordinates.

    ``half`` is the half-size of the composition in pixels; ``part_jitter`` moves/scales parts a little
    relative to each other and ``stretch`` squashes/shears the whole object, so no two images of a class are
    the same rigid template; ``vertex_jitter`` (pixels) wobbles outlines for hand-drawn styles.
    """
    ang = math.radians(rng.uniform(-rot_deg, rot_deg))
    c, s = math.cos(ang), math.sin(ang)
    sx, sy = 1 + rng.uniform(-stretch, stretch), 1 + rng.uniform(-stretch, stretch)
    shear = rng.uniform(-stretch, stretch) * 0.5
    lin = np.array([[c, -s], [s, c]]) @ np.array([[sx, shear], [0.0, sy]]) * half
    out = []
    for part in shape.parts:
        pc = np.asarray(part.center)
        local = (part.verts - pc) * (1 + rng.normal(0, part_jitter))
        v = (local + pc + rng.normal(0, part_jitter, 2)) @ lin.T + np.asarray(center)
        if vertex_jitter > 0:
            v = v + rng.normal(0, vertex_jitter, v.shape)
        out.append(v)
    return out


def densify(poly: np.ndarray, step: float) -> np.ndarray:
    """Closed polygon resampled with points every ``step`` pixels (for wobbly hand-drawn outlines)."""
    closed = np.concatenate([poly, poly[:1]])
    seg = np.diff(closed, axis=0)
    length = np.hypot(seg[:, 0], seg[:, 1])
    pts = []
    for p, d, n in zip(closed[:-1], seg, np.maximum(1, np.ceil(length / step)).astype(int)):
        pts.append(p + np.outer(np.arange(n) / n, d))
    return np.concatenate(pts)
