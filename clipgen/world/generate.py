"""Generate the embedded synthetic world in DomainNet's on-disk layout plus an ImageNet-Captions-style corpus.

    {world_dir}/world.json                      spec, hash, classes, counts ... (written last: marks completeness)
    {world_dir}/contact_sheet.png               one sample per domain x class
    {world_dir}/domainnet/{domain}/{ClassFolder}/{domain}_{label:03d}_{i:06d}.png   (.jpg: world.image_format=jpg)
    {world_dir}/domainnet/{domain}_{train,test}.txt
    {world_dir}/natural/imagenet_captions.json  [{filename, wnid, title, tags, description}, ...]
    {world_dir}/natural/train/{wnid}/{wnid}_{i:06d}.png                             (.JPEG: world.image_format=jpg)

Generation is idempotent and crash-safe: a complete world (world.json with a matching spec hash) is returned
untouched; otherwise the world is built in ``<world_dir>.tmp-<pid>`` and renamed into place in one step, so a
killed run never leaves something that looks complete, and of two concurrent builders the second discards
its copy. Every image's randomness comes from its own rng keyed by (seed, domain, label, split, index), so the
bytes do not depend on the number of workers or on the order in which chunks finish.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from clipgen import layout
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS, NATURAL_DOMAIN, class_folder, domainnet_classes, domainnet_to_imagenet, \
    imagenet_class_index
from clipgen.files import is_disk_error, sweep_stale_dirs, write_error
from clipgen.hashing import stable_hash
from clipgen.procs import process_pool
from clipgen.world.contact_sheet import make_contact_sheet
from clipgen.world.shapes import make_class_shapes

SPLITS = ("train", "test")
BASE_STREAM = len(DOMAINS)  # rng stream id of the natural base corpus (domains use their ids 0..5)
SALT_IMAGE, SALT_CAPTION, SALT_CLASSES = 1, 2, 3
CHUNK = 64  # images per work item: large enough to amortise IPC, small enough to balance two workers
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# world.image_format -> (DomainNet file suffix, natural-corpus suffix, PIL format): the real data's suffixes
IMAGE_FORMATS = {"png": (".png", ".png", "PNG"), "jpg": (".jpg", ".JPEG", "JPEG")}


def world_hash(cfg: DictConfig) -> str:
    """Hash of everything that determines the world's bytes (its directory name carries the first 10 chars)."""
    return stable_hash(layout.world_spec(cfg))


# --- validation and class selection ------------------------------------------------------------------------
def _int(cfg: DictConfig, key: str, lo: int) -> int:
    value = cfg.world.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ClipgenError(f"invalid world.{key}={value!r}: expected an integer >= {lo}")
    return value


def check_world_config(cfg: DictConfig) -> None:
    """Raise ClipgenError (one line naming the key) for a world config that cannot be generated."""
    w = cfg.world
    if not isinstance(w.get("name"), str) or not _NAME_RE.match(w.name):
        raise ClipgenError(f"invalid world.name={w.get('name')!r}: expected a non-empty name of letters, digits, "
                           "'_', '-' or '.' (it becomes part of a directory name)")
    _int(cfg, "seed", 0)
    for key in ("num_classes", "train_per_class", "test_per_class", "base_per_class"):
        _int(cfg, key, 1)
    for key in ("num_heldout", "num_distractors"):
        _int(cfg, key, 0)
    if w.get("image_format", "png") not in IMAGE_FORMATS:
        raise ClipgenError(f"invalid world.image_format={w.get('image_format')!r}: expected one of "
                           f"{', '.join(IMAGE_FORMATS)}")
    for key in ("image_px", "render_px"):  # any pair: drawn larger is downsampled, drawn smaller upscaled
        _int(cfg, key, 8)
    scale = w.get("domain_scale") or {}
    for key in scale:
        if key not in DOMAINS:
            raise ClipgenError(f"unknown domain {key!r} in world.domain_scale: expected keys among "
                               f"{', '.join(DOMAINS)}")
    for d in DOMAINS:
        v = scale.get(d)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ClipgenError(f"invalid world.domain_scale.{d}={v!r}: expected a positive number for each of "
                               f"{', '.join(DOMAINS)}")
    heldout = list(cfg.heldout.classes)
    names = set(domainnet_classes())
    for i, name in enumerate(heldout):
        if name not in names:
            raise ClipgenError(f"heldout.classes[{i}]={name!r} is not a DomainNet class: expected a caption-"
                               "spelling name from clipgen/resources/in_to_dn_mapping.json, e.g. 'aircraft carrier'")
    if len(set(heldout)) != len(heldout):
        raise ClipgenError("heldout.classes lists a class twice: expected distinct class names")
    if w.num_heldout > len(heldout):
        raise ClipgenError(f"invalid world.num_heldout={w.num_heldout}: expected <= {len(heldout)}, the number of "
                           f"heldout.classes (heldout={cfg.heldout.get('name')})")
    if w.num_classes < w.num_heldout:
        raise ClipgenError(f"invalid world.num_classes={w.num_classes}: expected >= world.num_heldout="
                           f"{w.num_heldout} (the held-out classes are part of the world)")
    free = len(names) - len(heldout)  # the rest of C2 is never drawn, see select_classes
    if (w.num_classes - w.num_heldout) + w.num_distractors > free:
        raise ClipgenError(f"world.num_classes={w.num_classes} + world.num_distractors={w.num_distractors} "
                           f"need more classes than DomainNet offers: expected at most {free + w.num_heldout} "
                           "in total")


def select_classes(cfg: DictConfig) -> tuple[list[str], list[str], list[str]]:
    """(world classes, held-out classes, distractor classes), each in DomainNet label order.

    The first ``num_heldout`` names of heldout.classes are always world classes. The remaining members of C2
    are never drawn, so the world's held-out set is exactly those forced in (a recipe that removes all of
    heldout.classes from the test domain removes exactly them)."""
    order = {c: i for i, c in enumerate(domainnet_classes())}
    heldout = sorted(cfg.heldout.classes[: cfg.world.num_heldout], key=order.get)
    excluded = set(cfg.heldout.classes)
    pool = [c for c in domainnet_classes() if c not in excluded]
    rng = np.random.default_rng([cfg.world.seed, SALT_CLASSES])
    drawn = [pool[i] for i in rng.permutation(len(pool))]
    n_rest = cfg.world.num_classes - len(heldout)
    world = sorted(heldout + drawn[:n_rest], key=order.get)
    distractors = sorted(drawn[n_rest:n_rest + cfg.world.num_distractors], key=order.get)
    return world, heldout, distractors


def split_sizes(cfg: DictConfig) -> dict[str, dict[str, int]]:
    """Images per class in each domain and split: round(per_class x domain_scale), at least 1."""
    per = {"train": cfg.world.train_per_class, "test": cfg.world.test_per_class}
    return {d: {s: max(1, int(round(per[s] * float(cfg.world.domain_scale[d])))) for s in SPLITS}
            for d in DOMAINS}


def base_wnid(name: str) -> str:
    """Folder id of a class in the natural corpus: its first mapped ImageNet wnid, else dn{label:03d}."""
    mapped = domainnet_to_imagenet()[name]
    if mapped:
        return imagenet_class_index()[mapped[0]][0]
    return f"dn{domainnet_classes().index(name):03d}"


# --- captions of the natural corpus ------------------------------------------------------------------------
# Small fixed vocabularies: the captions read like Flickr metadata (ImageNet-Captions) without growing the
# tokenizer's working vocabulary much. None of these words is a DomainNet class name.
_ADJ = ("old", "small", "big", "my", "our", "new", "nice", "little", "beautiful", "vintage", "favorite")
_FILLER_TITLES = ("untitled", "summer day", "weekend", "at home", "on the way", "day trip", "afternoon")
_TAGS = ("nikon", "canon", "summer", "travel", "family", "home", "city", "nature", "2008", "2009", "macro",
         "street", "friends", "vacation", "color", "garden", "park", "museum", "sunday", "trip")
_DESC_WITH = ("a {c} we saw on our trip", "my {c} on the table", "picture of a {c} in the garden",
              "this {c} was very old", "the {c} at the museum", "found this {c} near the park",
              "a {c} from the market", "our {c} at home")
_DESC_WITHOUT = ("taken near the city center", "one of my favorite shots", "just a quick snapshot",
                 "from our trip last summer", "at home on a sunday afternoon", "no flash")


def caption(name: str, rng: np.random.Generator) -> dict:
    """Noisy ImageNet-Captions-style text {title, tags, description}; names the class ~85% of the time.
    The title is never empty, so the reader never drops a pair for having no text."""
    mention = rng.random() < 0.85
    where = rng.random(3) < (0.7, 0.5, 0.6) if mention else np.zeros(3, bool)
    if mention and not where.any():
        where[0] = True
    if where[0]:
        title = str(rng.choice([f"{name}", f"the {name}", f"{rng.choice(_ADJ)} {name}"]))
    else:
        title = str(rng.choice([*_FILLER_TITLES, f"IMG_{int(rng.integers(1000, 9999))}"]))
    tags = [str(t) for t in rng.choice(_TAGS, size=int(rng.integers(0, 5)), replace=False)]
    if where[1]:
        tags.insert(int(rng.integers(len(tags) + 1)), name)
    if not where[1] and rng.random() < 0.2:
        tags = []
    if where[2]:
        description = str(rng.choice(_DESC_WITH)).format(c=name)
    else:
        description = "" if rng.random() < 0.3 else str(rng.choice(_DESC_WITHOUT))
    return {"title": title, "tags": tags, "description": description}


# --- rendering (runs in worker processes) -------------------------------------------------------------------
_CTX: dict = {}


def _init_worker(ctx: dict) -> None:
    _CTX.clear()
    _CTX.update(ctx)


def render_image(style: str, shape, key: tuple[int, int, int, int, int], px: int, out_px: int):
    """One world image: ``key`` = (world seed, stream, DomainNet label, split id, index) seeds its rng, so the
    pixels depend on nothing else. Drawn at ``px``, stored at ``out_px``."""
    from PIL import Image

    from clipgen.world.styles import render

    img = render(style, shape, np.random.default_rng([*key, SALT_IMAGE]), px)
    if px > out_px:
        img = img.reduce(px // out_px) if px % out_px == 0 else img.resize((out_px, out_px), Image.BOX)
    elif px < out_px:  # drawn small, stored large (the rehearsal world: 224 px files at a fraction of the cost)
        img = img.resize((out_px, out_px), Image.BILINEAR)
    return img


def _render_chunk(jobs: list[tuple]) -> int:
    seed, px, out_px, root, shapes, fmt = (_CTX[k] for k in ("seed", "render_px", "image_px", "root", "shapes",
                                                             "pil_format"))
    for style, name, stream, label, split_id, j, rel in jobs:
        img = render_image(style, shapes[name], (seed, stream, label, split_id, j), px, out_px)
        with open(os.path.join(root, rel), "wb") as f:
            if fmt == "PNG":
                img.save(f, format="PNG", compress_level=6)  # no metadata chunks: identical bytes every run
            else:
                img.save(f, format="JPEG", quality=90)  # baseline JPEG, no EXIF: identical bytes every run
    return len(jobs)


def _run_jobs(jobs: list[tuple], ctx: dict, workers: int) -> None:
    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    if workers <= 1:
        _init_worker(ctx)
        for c in chunks:
            _render_chunk(c)
        return
    with process_pool(min(workers, len(chunks)), _init_worker, (ctx,)) as pool:
        for _ in pool.map(_render_chunk, chunks):
            pass


# --- building -------------------------------------------------------------------------------------------
def _complete(path: Path, expected_hash: str) -> bool:
    try:
        with open(path / "world.json", "r", encoding="utf-8") as f:
            meta = json.load(f)
        return meta.get("hash") == expected_hash and stable_hash(meta.get("spec")) == expected_hash
    except (OSError, ValueError, AttributeError):
        return False


def _build(cfg: DictConfig, out: Path, started: float) -> dict:
    world, heldout, distractors = select_classes(cfg)
    shapes = make_class_shapes(world + distractors, cfg.world.seed)
    labels = {c: i for i, c in enumerate(domainnet_classes())}
    sizes = split_sizes(cfg)
    dn_ext, nat_ext, pil_format = IMAGE_FORMATS[cfg.world.get("image_format", "png")]
    jobs, sheet_cells = [], {}
    dn = out / "domainnet"
    for d_id, domain in enumerate(DOMAINS):
        lines = {s: [] for s in SPLITS}
        for name in world:
            label, folder = labels[name], class_folder(name)
            (dn / domain / folder).mkdir(parents=True)
            i = 0
            for split_id, split in enumerate(SPLITS):
                for j in range(sizes[domain][split]):
                    rel = f"{domain}/{folder}/{domain}_{label:03d}_{i:06d}{dn_ext}"
                    jobs.append((domain, name, d_id, label, split_id, j, "domainnet/" + rel))
                    lines[split].append(f"{rel} {label}\n")
                    if split == "test" and j == 0:
                        sheet_cells[(domain, name)] = dn / rel
                    i += 1
        for split in SPLITS:
            (dn / f"{domain}_{split}.txt").write_text("".join(lines[split]), encoding="utf-8")
    entries, wnids = [], {}
    for name in world + distractors:
        if cfg.world.get("base_imagenet_only") and not domainnet_to_imagenet()[name]:
            continue  # ImageNet-Captions holds only ImageNet classes
        label, wnid = labels[name], base_wnid(name)
        wnids[name] = wnid
        (out / "natural" / "train" / wnid).mkdir(parents=True)
        for i in range(cfg.world.base_per_class):
            fname = f"{wnid}_{i:06d}{nat_ext}"
            jobs.append((NATURAL_DOMAIN, name, BASE_STREAM, label, 0, i, f"natural/train/{wnid}/{fname}"))
            rng = np.random.default_rng([cfg.world.seed, BASE_STREAM, label, 0, i, SALT_CAPTION])
            entries.append({"filename": fname, "wnid": wnid, **caption(name, rng)})
            if i == 0:
                sheet_cells[("natural", name)] = out / "natural" / "train" / wnid / fname
    (out / "natural" / "imagenet_captions.json").write_text(json.dumps(entries, indent=1) + "\n", "utf-8")
    ctx = {"seed": cfg.world.seed, "render_px": cfg.world.render_px, "image_px": cfg.world.image_px,
           "root": str(out), "shapes": shapes, "pil_format": pil_format}
    _run_jobs(jobs, ctx, int(cfg.world.workers or 0))
    make_contact_sheet(out / "contact_sheet.png", [*DOMAINS, "natural"], world, sheet_cells,
                       cfg.world.image_px, heldout)
    spec = layout.world_spec(cfg)
    meta = {"spec": spec, "hash": stable_hash(spec), "classes": world, "heldout_classes": heldout,
            "distractor_classes": distractors, "base_wnids": wnids,
            "counts": {d: {s: sizes[d][s] * len(world) for s in SPLITS} for d in DOMAINS},
            "base_count": len(entries), "seconds": round(time.time() - started, 3)}
    # world.json last: its presence (with the right hash) is what makes the directory a complete world.
    (out / "world.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def _generate(cfg: DictConfig) -> tuple[Path, bool]:
    check_world_config(cfg)
    final, expected = layout.world_dir(cfg), world_hash(cfg)
    if _complete(final, expected):
        return final, False
    started = time.time()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    sweep_stale_dirs(final.parent, f"{final.name}.tmp-*")  # builds of killed runs (judged by age: shared roots)
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier process that had our pid
    try:
        _build(cfg, tmp, started)
        try:
            os.rename(tmp, final)  # atomic; fails if the final directory exists (non-empty)
        except OSError:
            if _complete(final, expected):  # a concurrent builder finished first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return final, False
            if not final.exists():
                raise
            # A damaged directory (no valid world.json) is never a complete world: move it aside, replace it.
            aside = final.with_name(f"{final.name}.stale-{os.getpid()}")
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_error(e):  # a full disk: one line naming the world and the space left
            raise write_error(final, e, "world") from None
        raise
    return final, True


def ensure_world(cfg: DictConfig) -> None:
    """Generate the synthetic world if the config reads from it and it is not there yet (a no-op otherwise: the
    world is keyed by its spec hash). Stages call this explicitly before reading; readers never build."""
    if cfg.data.source == "world" or cfg.data.base == "world":
        generate_world(cfg)


def generate_world(cfg: DictConfig) -> Path:
    """Build the world the config describes if it is not there yet; return its directory."""
    return _generate(cfg)[0]


def run_world(cfg: DictConfig) -> dict:
    """Console entry (clipgen-world): generate if needed, print where the world is, return a summary."""
    started = time.time()
    path, generated = _generate(cfg)
    with open(path / "world.json", "r", encoding="utf-8") as f:
        meta = json.load(f)
    n = sum(c["train"] + c["test"] for c in meta["counts"].values()) + meta["base_count"]
    seconds = time.time() - started
    sheet = path / "contact_sheet.png"
    verb = f"generated in {seconds:.1f} s" if generated else "already complete, nothing to do"
    print(f"world {path} ({verb}): {n} images ({n - meta['base_count']} in DomainNet layout under "
          f"domainnet/, {meta['base_count']} in the natural corpus); contact sheet: {sheet}")
    return {"world_dir": str(path), "num_images": n, "seconds": round(seconds, 3), "contact_sheet": str(sheet),
            "generated": generated}
