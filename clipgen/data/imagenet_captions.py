"""Reader for ImageNet-Captions (``imagenet_captions.json`` + ImageNet's train folders), the paper's base corpus.
The synthetic world writes its natural corpus in the same format, so one reader serves both.

Caption rule: "; ".join of the non-empty [title, " ".join(tags), description], whitespace normalised.
Class: ImageNet wnids map to DomainNet labels through in_to_dn_mapping.json (-1 where none); the world uses
wnids of the form ``dn{label:03d}`` for DomainNet classes without an ImageNet counterpart.

Also ImageNet-Sketch (optional extra sketches): ``{root}/{wnid}/{file}``, one folder per ImageNet class. Only
classes that map to a DomainNet class are kept; each sample takes that DomainNet class's name and label, domain
"sketch", split train, source "imagenet_sketch". With ``data.use_imagenet_sketch=true`` they are appended to the
source index, so they join the sketch domain's candidate lists after DomainNet's own samples (never val/test, and
never counted in S; see recipes/plan.py).
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from clipgen.data.index import Sample
from clipgen.errors import ClipgenError
from clipgen.facts import domainnet_classes, domainnet_to_imagenet, imagenet_class_index
from clipgen.files import read_json

_WS = re.compile(r"\s+")


def make_caption(title: str | None, tags, description: str | None) -> str:
    tags_text = " ".join(t for t in (tags or []) if t)
    parts = [_WS.sub(" ", p or "").strip() for p in (title, tags_text, description)]
    return "; ".join(p for p in parts if p)


@lru_cache(maxsize=None)
def wnid_table() -> dict[str, tuple[str, int]]:
    """wnid -> (class name, DomainNet label or -1)."""
    in_to_dn: dict[int, int] = {}
    for label, name in enumerate(domainnet_classes()):
        for idx in domainnet_to_imagenet()[name] or []:
            in_to_dn.setdefault(idx, label)
    table = {wnid: (name.replace("_", " "), in_to_dn.get(idx, -1))
             for idx, (wnid, name) in imagenet_class_index().items()}
    for label, name in enumerate(domainnet_classes()):
        table[f"dn{label:03d}"] = (name, label)
    return table


def read_imagenet_captions(json_path: str | os.PathLike, train_root: str | os.PathLike,
                           source: str = "imagenet_captions") -> list[Sample]:
    json_path, train_root = Path(json_path), Path(train_root)
    entries = read_json(json_path, "ImageNet-Captions file")
    if not isinstance(entries, list):
        raise ClipgenError(f"ImageNet-Captions file {str(json_path)!r} must hold a JSON list of "
                           "{filename, wnid, title, tags, description} objects")
    table = wnid_table()
    samples = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "filename" not in e:
            raise ClipgenError(f"entry {i} of {str(json_path)!r} has no 'filename': expected "
                               "{filename, wnid, title, tags, description}")
        fname = e["filename"]
        wnid = e.get("wnid") or fname.split("_")[0]
        if wnid not in table:
            raise ClipgenError(f"entry {i} of {str(json_path)!r}: unknown wnid {wnid!r} (expected an ImageNet "
                               "wnid or dnNNN)")
        name, label = table[wnid]
        caption = make_caption(e.get("title"), e.get("tags"), e.get("description"))
        if not caption:
            continue  # a pair without any text cannot be used for contrastive training
        samples.append(Sample(sample_id=f"base/{wnid}/{os.path.splitext(fname)[0]}",
                              path=str(train_root / wnid / fname), domain="natural", class_name=name,
                              label=label, split="train", source=source, caption=caption))
    if not samples:
        raise ClipgenError(f"ImageNet-Captions file {str(json_path)!r} has no usable entries")
    return samples


# --- ImageNet-Sketch -----------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SKETCH_SOURCE = "imagenet_sketch"


def read_imagenet_sketch(root: str | os.PathLike, classes: set[str] | None = None,
                         key: str = "data.imagenet_sketch_root") -> list[Sample]:
    """Samples of every wnid folder that maps to a DomainNet class (restricted to ``classes`` if given), in
    sorted folder / file order."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise ClipgenError(f"{key}={str(root)!r} is not a directory: expected ImageNet-Sketch's {{wnid}}/{{file}} "
                           "folders (e.g. n01440764/)")
    table = wnid_table()
    names = domainnet_classes()
    samples: list[Sample] = []
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ClipgenError(f"{key}={str(root)!r} has no class folders: expected one folder per ImageNet wnid")
    for wnid in folders:
        if wnid not in table or wnid.startswith("dn"):
            raise ClipgenError(f"unknown folder {wnid!r} in {key}={str(root)!r}: expected ImageNet wnid folders "
                               "(e.g. n01440764)")
        label = table[wnid][1]
        if label < 0 or (classes is not None and names[label] not in classes):
            continue  # no DomainNet counterpart (or not in the source's classes): not a DomainNet-class sketch
        files = sorted(f for f in os.listdir(root / wnid) if f.lower().endswith(IMAGE_SUFFIXES))
        for f in files:
            samples.append(Sample(sample_id=f"{SKETCH_SOURCE}/{wnid}/{os.path.splitext(f)[0]}",
                                  path=str(root / wnid / f), domain="sketch", class_name=names[label], label=label,
                                  split="train", source=SKETCH_SOURCE))
    return samples
