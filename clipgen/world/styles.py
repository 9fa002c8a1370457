"""The six domain renderers of the synthetic world.

Each renderer draws one posed instance of a class composition (shapes.py) at ``px`` pixels. The styles are
built to mirror how DomainNet's domains relate to each other, not to make any recipe win:

- real / painting: filled, textured objects in natural colours on busy backgrounds (shared texture + colour);
- sketch / quickdraw / clipart: the object is carried by dark outlines (shared line structure), with hatching
  on paper, bare wobbly strokes on white, or flat saturated fills respectively;
- infograph: the object (natural colours, sometimes outlined or on a backing disc) among text-like bars, small
  icons and panels on a coloured layout, placed anywhere from the left to the right edge.

How far each style is from real is calibrated against DomainNet's published transfer from real (docs/world.md,
measured with clipgen.world.probe); changing a renderer changes the pixels, so bump layout's generator_version.

Colours are drawn per image from the style's palette, never per class: a class must be recognised by shape.
Line widths are given for a 64 px canvas and scaled with ``px``; outlines are >= 2 px there so that they
survive the 2x box downsampling to 32 px.
"""
from __future__ import annotations

import colorsys
import math
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipgen.world.shapes import PRIMITIVES, ClassShape, densify, pose


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))) * 255.0


def _tup(c: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(x) for x in np.clip(c, 0, 255))


# Natural-looking colour families (hue range, saturation range, weight): earth, foliage, sky/water, neutral
# greys, red/orange, sand/yellow and a little purple. Shared by real and painting (and the base corpus).
_NATURAL_FAMILIES = (((0.05, 0.11), (0.35, 0.7), 0.22), ((0.2, 0.38), (0.3, 0.65), 0.2),
                     ((0.53, 0.62), (0.25, 0.6), 0.18), ((0.0, 1.0), (0.0, 0.12), 0.18),
                     ((0.98, 1.04), (0.5, 0.8), 0.08), ((0.11, 0.16), (0.3, 0.6), 0.1),
                     ((0.7, 0.85), (0.2, 0.4), 0.04))
_FAMILY_CDF = np.cumsum([f[2] for f in _NATURAL_FAMILIES]) / sum(f[2] for f in _NATURAL_FAMILIES)


def _natural(rng, v_lo=0.3, v_hi=0.9) -> np.ndarray:
    family = min(int(np.searchsorted(_FAMILY_CDF, rng.random(), side="right")), len(_NATURAL_FAMILIES) - 1)
    (h0, h1), (s0, s1), _ = _NATURAL_FAMILIES[family]
    return _hsv(rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v_lo, v_hi))


def _vivid(rng) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))


def _flat(poly: np.ndarray) -> list[float]:
    return poly.ravel().tolist()


def _closed(poly: np.ndarray) -> list[float]:
    return np.concatenate([poly, poly[:1]]).ravel().tolist()


def _mask(polys: list[np.ndarray], px: int) -> np.ndarray:
    img = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(img)
    for p in polys:
        draw.polygon(_flat(p), fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


@lru_cache(maxsize=8)
def _grid(px: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:px, 0:px].astype(np.float32) / max(px - 1, 1) - 0.5
    return y[..., None], x[..., None]


def _gradient(rng, px: int, lo: float, hi: float) -> np.ndarray:
    """(px, px, 1) linear ramp from lo to hi along a random direction (lighting, sky/ground)."""
    a = rng.uniform(0, 2 * math.pi)
    y, x = _grid(px)
    t = (x * math.cos(a) + y * math.sin(a)) * 0.704 + 0.5
    return lo + (hi - lo) * t


def _lowfreq(rng, px: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] (blotchy texture, uneven lighting)."""
    small = Image.fromarray(rng.random((cells, cells), dtype=np.float32))
    return np.asarray(small.resize((px, px), Image.BILINEAR))[..., None]


def _to_img(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _random_clutter(draw: ImageDraw.ImageDraw, rng, px: int, n: int, colour: Callable, lo=4, hi=16) -> None:
    """Background stuff: ellipses, boxes and irregular blobs. Deliberately not the class primitives, so the
    background never draws a second (wrong) class part next to the object."""
    k = px / 64
    for _ in range(n):
        c = rng.uniform(0, px, 2)
        r = rng.uniform(lo, hi, 2) * k
        kind = rng.integers(3)
        fill = _tup(colour(rng))
        if kind == 0:
            draw.ellipse([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]], fill=fill)
        elif kind == 1:
            draw.rectangle([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]], fill=fill)
        else:
            t = np.sort(rng.uniform(0, 2 * math.pi, 7))
            rad = rng.uniform(0.5, 1.0, 7)[:, None] * r
            draw.polygon(_flat(c + rad * np.stack([np.cos(t), np.sin(t)], 1)), fill=fill)


# --- real: shaded, textured objects on cluttered, blurred backgrounds ------------------------------------
def _photo_backdrop(rng, px: int, blur: float) -> np.ndarray:
    """Two-colour natural backdrop with out-of-focus clutter (shared by real and painting)."""
    k = px / 64
    c1, c2 = _natural(rng), _natural(rng)
    g = _gradient(rng, px, 0.0, 1.0)
    bg = _to_img(c1 * (1 - g) + c2 * g)
    # Clutter in colours pulled toward the backdrop and out of focus: busy, but the sharp subject stays salient.
    mean = (c1 + c2) / 2
    _random_clutter(ImageDraw.Draw(bg), rng, px, int(rng.integers(3, 9)),
                    lambda r: 0.5 * _natural(r) + 0.5 * mean, 4, 16)
    bg = bg.filter(ImageFilter.GaussianBlur(blur * k))
    # Surface texture (foliage, grain, fabric): mid-frequency mottling, sometimes streaked along one axis.
    # Photos are textured too, so texture alone does not tell a photo from a painting.
    cells = int(rng.integers(12, 24))
    shape = [(cells, cells), (cells, 4), (4, cells)][int(rng.integers(3))]
    small = Image.fromarray(rng.random(shape, dtype=np.float32))
    texture = np.asarray(small.resize((px, px), Image.BILINEAR))[..., None]
    return np.asarray(bg, dtype=np.float32) * (0.85 + 0.3 * _lowfreq(rng, px, 5)) * (0.86 + 0.28 * texture)


def _subject_colour(rng, bg_lum: float) -> np.ndarray:
    # Like a photographed subject, the object usually stands out in brightness from what is behind it.
    dark = bg_lum > 0.5 if rng.random() < 0.9 else rng.random() < 0.5
    return _natural(rng, 0.12, 0.45) if dark else _natural(rng, 0.65, 0.98)


def draw_real(polys, rng, px):
    k = px / 64
    arr = _photo_backdrop(rng, px, 2.0)
    arr += rng.normal(0, 5, (px, px, 1)).astype(np.float32)  # sensor noise
    bg_lum = float(arr.mean()) / 255
    # Soft cast shadow of the object.
    off = rng.uniform(1, 4, 2) * k
    shadow = Image.fromarray((_mask([p + off for p in polys], px) * 255).astype(np.uint8))
    shadow = np.asarray(shadow.filter(ImageFilter.GaussianBlur(2 * k)), dtype=np.float32)[..., None] / 255
    arr *= 1 - 0.4 * shadow
    shade = _gradient(rng, px, rng.uniform(0.6, 0.85), rng.uniform(1.0, 1.2))  # light falls from one side
    tex = (0.85 + 0.3 * _lowfreq(rng, px, int(rng.integers(5, 12)))) * \
        (1 + rng.normal(0, 0.05, (px, px, 1)).astype(np.float32))
    light = shade * tex
    colour = None
    for p in polys:
        if colour is None or rng.random() > 0.35:  # sometimes parts share a colour: only the outline remains
            colour = _subject_colour(rng, bg_lum)
        arr = np.where(_mask([p], px)[..., None] > 0.5, light * colour.astype(np.float32), arr)
    arr *= _gradient(rng, px, rng.uniform(0.8, 0.95), rng.uniform(1.0, 1.15))
    return _to_img(arr)


# --- sketch: dark pencil contours with hatching on light paper -------------------------------------------
def _hatch(px: int, angle: float, spacing: float, width: int) -> np.ndarray:
    """(px, px, 1) field of parallel pencil lines in [0, 1]."""
    hatch = Image.new("L", (px, px), 0)
    hd = ImageDraw.Draw(hatch)
    dx, dy = math.cos(angle), math.sin(angle)
    for t in np.arange(-px, px, spacing):
        cx, cy = px / 2 - dy * t, px / 2 + dx * t
        hd.line([cx - dx * px, cy - dy * px, cx + dx * px, cy + dy * px], fill=255, width=width)
    return np.asarray(hatch, np.float32)[..., None] / 255


def draw_sketch(polys, rng, px):
    k = px / 64
    paper = rng.uniform(232, 250)
    arr = np.full((px, px, 3), paper, np.float32) + [2, 1, -3]
    arr += (rng.normal(0, 3, (px, px, 1)) + 10 * (_lowfreq(rng, px, 4) - 0.5)).astype(np.float32)
    base_angle = rng.uniform(0, math.pi)
    lw = max(1, int(k))
    if rng.random() < 0.5:  # a hatched cast shadow / ground patch beside the object
        allp = np.concatenate(polys)
        c = allp.mean(0) + rng.uniform(-8, 8, 2) * k + [0, (allp[:, 1].max() - allp[:, 1].mean()) * 0.8]
        r = rng.uniform([10, 3], [22, 8]) * k
        shadow = Image.new("L", (px, px), 0)
        ImageDraw.Draw(shadow).ellipse([*(c - r), *(c + r)], fill=255)
        m = np.asarray(shadow, np.float32)[..., None] / 255
        arr -= _hatch(px, base_angle + 0.8, rng.uniform(3, 5) * k, lw) * m * rng.uniform(40, 90)
    if rng.random() < 0.8:  # smudged graphite tone: each part shaded a little darker or lighter
        for p in polys:
            arr -= _mask([p], px)[..., None] * rng.uniform(30, 150)
    for p in polys:
        if rng.random() < 0.7:
            h = _hatch(px, base_angle + rng.normal(0, 0.3), rng.uniform(3, 5) * k, lw)
            arr -= h * _mask([p], px)[..., None] * rng.uniform(70, 130)
    img = _to_img(arr)
    draw = ImageDraw.Draw(img)
    ink = int(rng.uniform(15, 70))
    for p in polys:
        pts = densify(p, 4 * k)
        pts = pts + rng.normal(0, 0.5 * k, pts.shape)
        draw.line(_closed(pts), fill=(ink,) * 3, width=int(round(rng.choice([2, 2, 3]) * k)), joint="curve")
        if rng.random() < 0.5:  # a second, lighter pass: the sketchy double line
            pts2 = pts + rng.normal(0, 0.8 * k, pts.shape)
            draw.line(_closed(pts2), fill=(ink + 50,) * 3, width=lw)
    for _ in range(int(rng.integers(0, 4))):  # stray construction strokes and a ground line
        a, b = rng.uniform(0, px, 2), rng.uniform(-14, 14, 2) * k
        draw.line([*a, *(a + b)], fill=(int(rng.uniform(90, 170)),) * 3, width=lw)
    return img


# --- quickdraw: thin, wobbly, single-colour strokes on pure white, sometimes incomplete --------------------
def draw_quickdraw(polys, rng, px):
    k = px / 64
    img = Image.new("RGB", (px, px), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    width = int(round(2 * k))
    skip = int(rng.integers(len(polys))) if rng.random() < 0.6 else -1
    drop = int(rng.integers(len(polys))) if len(polys) > 1 and rng.random() < 0.25 else -1
    for j, p in enumerate(polys):
        if j == drop and j != skip:  # a part never drawn at all
            continue
        pts = densify(p, 3 * k)
        walk = np.cumsum(rng.normal(0, 0.9 * k, pts.shape), axis=0)  # drifting hand
        pts = pts + walk - walk.mean(0) + rng.normal(0, 0.7 * k, pts.shape)
        if j == skip:  # an unfinished doodle: part of one outline is missing
            n = len(pts)
            start, length = int(rng.integers(n)), int(n * rng.uniform(0.3, 0.6))
            pts = np.roll(pts, -start, axis=0)[length:]
            draw.line(_flat(pts), fill=(0, 0, 0), width=width, joint="curve")
        else:
            over = int(rng.integers(0, 4))  # strokes overshoot their starting point
            draw.line(_flat(np.concatenate([pts, pts[:1 + over]])), fill=(0, 0, 0), width=width, joint="curve")
    return img


# --- clipart: flat saturated fills, thick black outlines, plain background ----------------------------------
def draw_clipart(polys, rng, px):
    k = px / 64
    bg = (255, 255, 255) if rng.random() < 0.55 else _tup(_hsv(rng.random(), rng.uniform(0.05, 0.3), 1.0))
    img = Image.new("RGB", (px, px), bg)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.3:  # a flat blob behind the object, a common clipart backdrop
        c, r = rng.uniform(0.35, 0.65, 2) * px, rng.uniform(20, 30) * k
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=_tup(_hsv(rng.random(), 0.25, 0.97)))
    if rng.random() < 0.3:
        off = 2.5 * k
        for p in polys:
            draw.polygon(_flat(p + off), fill=(150, 150, 150))
    width = int(round(rng.choice([2, 3, 3]) * k))
    fill = _vivid if rng.random() < 0.4 else _natural  # bright flat colours, or the object's own colours
    for p in polys:
        draw.polygon(_flat(p), fill=_tup(fill(rng)))
        if rng.random() < 0.35:  # flat highlight
            c = p.mean(0)
            draw.polygon(_flat((p - c) * 0.45 + c - [2 * k, 2 * k]), fill=(255, 255, 255))
    if rng.random() < 0.5:  # soft shading across the object, as many cliparts have
        arr = np.asarray(img, np.float32)
        shade = _gradient(rng, px, rng.uniform(0.6, 0.8), rng.uniform(1.0, 1.15))
        arr = np.where(_mask(polys, px)[..., None] > 0.5, arr * shade, arr)
        img = _to_img(arr)
        draw = ImageDraw.Draw(img)
    if rng.random() < 0.45:  # many cliparts are outlined in black; the rest are bare flat shapes
        for p in polys:
            draw.line(_closed(p), fill=(0, 0, 0), width=width, joint="curve")
    return img


# --- painting: brush strokes, shifted colours, soft edges on canvas ------------------------------------------
def _strokes(draw, rng, k, centres, colours, angle, lo, hi, width, jitter=0.2):
    """Short straight brush strokes (one per centre), drawn in one batch of random numbers for speed.
    ``colours`` is one colour or one per stroke; each stroke varies it a little."""
    n = len(centres)
    a = angle + rng.normal(0, 0.35, n)
    d = np.stack([np.cos(a), np.sin(a)], 1) * (rng.uniform(lo, hi, n) * k / 2)[:, None]
    cols = np.asarray(colours) * rng.uniform(1 - jitter, 1 + jitter, (n, 1)) + rng.normal(0, 60 * jitter, (n, 3))
    cols = np.clip(cols, 0, 255).astype(int).tolist()
    widths = np.round(rng.uniform(width[0], width[1], n) * k).astype(int).tolist()
    for seg, col, w in zip(np.concatenate([centres - d, centres + d], 1).tolist(), cols, widths):
        draw.line(seg, fill=tuple(col), width=w)


def draw_painting(polys, rng, px):
    k = px / 64
    # The photo's backdrop, re-laid in brush strokes that pick up the colour underneath them.
    arr = _photo_backdrop(rng, px, 1.2)
    img = _to_img(arr)
    draw = ImageDraw.Draw(img)
    angle = rng.uniform(0, math.pi)
    centres = rng.uniform(0, px - 1, (int(rng.integers(30, 45)), 2))
    ij = centres.astype(int)
    _strokes(draw, rng, k, centres, arr[ij[:, 1], ij[:, 0]], angle, 6, 16, (3, 6), jitter=0.12)
    bg_lum = float(arr.mean()) / 255
    for p in polys:
        colour = np.clip(_subject_colour(rng, bg_lum) * 1.1 + rng.normal(0, 12, 3), 0, 255)
        layer = img.copy()
        ld = ImageDraw.Draw(layer)
        ld.polygon(_flat(p), fill=_tup(colour))
        lo, hi = p.min(0), p.max(0)
        centres = rng.uniform(lo, hi, (int(rng.integers(10, 18)), 2))
        _strokes(ld, rng, k, centres, colour, rng.uniform(0, math.pi), 5, 12, (3, 5))
        mask = Image.new("L", (px, px), 0)
        ImageDraw.Draw(mask).polygon(_flat(p), fill=255)
        img = Image.composite(layer, img, mask)
        # Loose strokes in the object's colour across its outline: painted edges are ragged, not crisp.
        edge = densify(p, 6 * k)
        edge = edge[rng.choice(len(edge), size=min(len(edge), int(rng.integers(2, 6))), replace=False)]
        _strokes(ImageDraw.Draw(img), rng, k, edge, colour, rng.uniform(0, math.pi), 4, 8, (2, 3))
    img = img.filter(ImageFilter.GaussianBlur(0.6 * k))  # wet, soft edges
    arr = np.asarray(img, np.float32)
    grey = arr.mean(2, keepdims=True)
    arr = grey + (arr - grey) * rng.uniform(1.0, 1.3)  # painters push saturation ...
    arr = arr * rng.uniform(0.85, 1.15, 3) + rng.normal(0, 10, 3)  # ... and cast the palette warm or cool
    weave = np.indices((px, px)).sum(0) % 2  # canvas grain
    arr += (weave[..., None] * 6 - 3 + rng.normal(0, 4, (px, px, 1))).astype(np.float32)
    return _to_img(arr)


# --- infograph: a smaller object among text bars, icons and blocks on a coloured layout ---------------------
def draw_infograph(polys, rng, px):
    k = px / 64
    hue = rng.random()
    img = Image.new("RGB", (px, px), _tup(_hsv(hue, rng.uniform(0.15, 0.6), rng.uniform(0.75, 1.0))))
    draw = ImageDraw.Draw(img)
    allp = np.concatenate(polys)
    lo, hi = allp.min(0) - 2 * k, allp.max(0) + 2 * k
    for _ in range(int(rng.integers(0, 3))):  # layout blocks / panels
        x0, y0 = rng.uniform(0, px * 0.7, 2)
        w, h = rng.uniform(12, 40, 2) * k
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=_tup(_hsv(hue + rng.uniform(-0.3, 0.3),
                                                                    rng.uniform(0.2, 0.8), rng.uniform(0.5, 1))))
    if rng.random() < 0.4:  # header bar
        draw.rectangle([0, 0, px, rng.uniform(5, 9) * k], fill=_tup(_hsv(hue + 0.5, 0.7, 0.45)))
    bg_col = np.asarray(img.getpixel((px // 2, px - 1)), float)
    text = _tup([np.full(3, 30.0), np.full(3, 250.0), bg_col * 0.7][int(rng.choice(3, p=[0.5, 0.25, 0.25]))])
    density = rng.choice([0.0, 0.2, 0.5])  # some layouts are mostly picture, some mostly text
    y = rng.uniform(3, 8) * k
    while y < px - 3 * k:  # rows of "words" left and right of the object
        x = rng.uniform(1, 5) * k
        while x < px - 4 * k:
            w = rng.uniform(3, 11) * k
            inside = lo[0] - w < x < hi[0] and lo[1] - 3 * k < y < hi[1]
            if not inside and rng.random() < density:
                draw.rectangle([x, y, x + w, y + 1.6 * k], fill=text)
            x += w + rng.uniform(1.5, 3) * k
        y += rng.uniform(4.5, 7) * k
    names = sorted(PRIMITIVES)
    for _ in range(int(rng.integers(0, 4))):  # small icons (any primitive) and chart bits away from the object
        c = rng.uniform(3, px - 3, 2)
        if lo[0] - 4 * k < c[0] < hi[0] + 4 * k and lo[1] - 4 * k < c[1] < hi[1] + 4 * k:
            continue
        verts = PRIMITIVES[names[int(rng.integers(len(names)))]]
        draw.polygon(_flat(verts * rng.uniform(2.5, 6) * k + c), fill=_tup(_vivid(rng)))
    if rng.random() < 0.5:  # a light backing disc makes the object pop like an infographic icon
        c, r = (lo + hi) / 2, (hi - lo).max() / 2 + 2 * k
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=_tup(_hsv(hue, 0.1, 1.0)))
    # The picture in natural colours (vivid fills put it beyond what transfers from real, see docs/world.md).
    palette = _natural
    one = palette(rng) if rng.random() < 0.5 else None
    outline = rng.random() < 0.3
    for p in polys:
        draw.polygon(_flat(p), fill=_tup(one if one is not None else palette(rng)))
        if outline:
            draw.line(_closed(p), fill=(20, 20, 20), width=int(round(2 * k)), joint="curve")
    return img


def _pose_center(rng, px, jitter):
    return tuple(px / 2 + rng.uniform(-jitter, jitter, 2) * px / 64)


def _infograph_pose(shape, rng, px):
    k = px / 64
    half = rng.uniform(19, 25) * k  # the picture: about as large as a photo's subject
    side = rng.uniform(-1.0, 1.0)  # anywhere from the left edge to the right edge of the layout
    cx = px / 2 + side * (px / 2 - half - 3 * k) + rng.uniform(-3, 3) * k
    cy = rng.uniform(half + 4 * k, px - half - 2 * k)
    return pose(shape, rng, (cx, cy), half, rot_deg=15, part_jitter=0.04)


# style -> (pose of the object, renderer). Pose ranges are per style: doodles fill the frame and wobble.
STYLES: dict[str, tuple[Callable, Callable]] = {
    "real": (lambda s, r, px: pose(s, r, _pose_center(r, px, 5), r.uniform(18, 25) * px / 64), draw_real),
    "sketch": (lambda s, r, px: pose(s, r, _pose_center(r, px, 5), r.uniform(18, 25) * px / 64,
                                     vertex_jitter=0.3 * px / 64), draw_sketch),
    "quickdraw": (lambda s, r, px: pose(s, r, _pose_center(r, px, 4), r.uniform(20, 26) * px / 64,
                                        rot_deg=45, part_jitter=0.15, stretch=0.35), draw_quickdraw),
    "clipart": (lambda s, r, px: pose(s, r, _pose_center(r, px, 4), r.uniform(19, 25) * px / 64, rot_deg=15),
                draw_clipart),
    "painting": (lambda s, r, px: pose(s, r, _pose_center(r, px, 5), r.uniform(18, 25) * px / 64,
                                       part_jitter=0.06), draw_painting),
    "infograph": (_infograph_pose, draw_infograph),
}


def render(style: str, shape: ClassShape, rng: np.random.Generator, px: int) -> Image.Image:
    """One RGB image of ``shape`` in ``style`` at ``px`` x ``px`` (all randomness from ``rng``)."""
    pose_fn, draw_fn = STYLES[style]
    return draw_fn(pose_fn(shape, rng, px), rng, px)
