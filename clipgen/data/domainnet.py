"""Reader for DomainNet's on-disk layout, used unchanged for real DomainNet and for the synthetic world.

    {root}/{domain}/{ClassFolder}/{file}          images
    {root}/{domain}_train.txt, {domain}_test.txt  lines "domain/ClassFolder/file label"

Labels come from the split files and must agree with DomainNet's label order (clipgen/resources). A validation
split is carved from train by a stable hash, stratified per domain x class; the test split is never touched.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from clipgen.data.index import Sample
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS, class_name_from_folder, domainnet_classes

SPLITS = ("train", "test")


def _label_table() -> dict[str, int]:
    return {c: i for i, c in enumerate(domainnet_classes())}


def read_split_file(root: Path, domain: str, split: str, check_files: bool = True) -> list[Sample]:
    """Parse ``{domain}_{split}.txt``; every problem is reported with the file, line and what was expected."""
    path = root / f"{domain}_{split}.txt"
    if not path.is_file():
        raise ClipgenError(f"split file {str(path)!r} is missing: expected DomainNet's layout "
                           f"({domain}_train.txt and {domain}_test.txt next to the {domain}/ folder)")
    labels = _label_table()
    samples: list[Sample] = []
    listing: dict[str, set[str]] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ClipgenError(f"malformed line in split file {where}: {line!r}; expected "
                                   f"'{domain}/<class>/<file> <label>'")
            rel, label = parts[0], int(parts[1])
            pieces = rel.split("/")
            if len(pieces) != 3 or pieces[0] != domain:
                raise ClipgenError(f"malformed path in split file {where}: {rel!r}; expected "
                                   f"'{domain}/<class>/<file>'")
            folder, fname = pieces[1], pieces[2]
            name = class_name_from_folder(folder)
            if name not in labels:
                raise ClipgenError(f"unknown class {folder!r} in split file {where}: expected one of DomainNet's "
                                   f"345 class folders")
            if labels[name] != label:
                raise ClipgenError(f"wrong label {label} for class {folder!r} in split file {where}: "
                                   f"expected {labels[name]} (DomainNet's label order)")
            if check_files:
                if folder not in listing:
                    d = root / domain / folder
                    listing[folder] = set(os.listdir(d)) if d.is_dir() else set()
                if fname not in listing[folder]:
                    raise ClipgenError(f"split file {where} lists {rel!r}, which does not exist under "
                                       f"{str(root)!r}: expected the split file to match the image folders")
            samples.append(Sample(sample_id=os.path.splitext(rel)[0], path=str(root / rel), domain=domain,
                                  class_name=name, label=label, split=split, source="domainnet"))
    if not samples:
        raise ClipgenError(f"split file {str(path)!r} is empty: expected one line per image")
    return samples


def _val_key(seed: int, sample_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{sample_id}".encode("utf-8")).digest()


def carve_validation(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """Mark round(fraction * n) train samples of every domain x class as ``val`` (smallest stable hashes).
    Order is preserved, so "first n in split-file order" still refers to the split file."""
    if not 0.0 <= fraction < 1.0:
        raise ClipgenError(f"invalid data.val_fraction {fraction!r}: expected 0 <= fraction < 1")
    if fraction == 0.0:
        return samples
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.split == "train":
            groups[(s.domain, s.class_name)].append(i)
    val: set[int] = set()
    for idx in groups.values():
        k = int(round(fraction * len(idx)))
        if k:
            val.update(sorted(idx, key=lambda i: _val_key(seed, samples[i].sample_id))[:k])
    return [Sample(**{**s.__dict__, "split": "val"}) if i in val else s for i, s in enumerate(samples)]


def check_duplicates(samples: list[Sample]) -> None:
    """Every image once: a path listed twice (e.g. in train and test, a leak) is an error naming both files."""
    seen: dict[str, Sample] = {}
    for s in samples:
        prev = seen.setdefault(s.sample_id, s)
        if prev is not s:
            raise ClipgenError(f"image {s.sample_id!r} is listed twice (in {prev.domain}_{prev.split}.txt and "
                               f"{s.domain}_{s.split}.txt): expected every image in exactly one split file line")


def check_all_classes(samples: list[Sample], domains: Iterable[str]) -> None:
    """Real DomainNet has every class in every domain: a class listed in some domains' split files but in
    neither split file of another domain is an error (data.allow_missing_classes=true allows it)."""
    present: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        present[s.domain].add(s.class_name)
    every = set().union(*present.values())
    for d in domains:
        missing = sorted(every - present[d])
        if missing:
            others = [o for o in domains if missing[0] in present[o]]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ClipgenError(f"class {missing[0]!r} is missing from domain {d!r}{more}: it is listed in "
                               f"{', '.join(others)} but in neither {d}_train.txt nor {d}_test.txt; expected every "
                               "class in every domain (set data.allow_missing_classes=true to allow it)")


def read_domainnet(root: str | os.PathLike, domains: Iterable[str] = DOMAINS, val_fraction: float = 0.0,
                   val_seed: int = 0, check_files: bool = True, require_all_classes: bool = False) -> list[Sample]:
    """All samples of the given domains (train, val carved from train, test) in split-file order. With
    ``require_all_classes`` every class of any domain must occur in every domain (real DomainNet)."""
    root, domains = Path(root), tuple(domains)
    if not root.is_dir():
        raise ClipgenError(f"DomainNet root {str(root)!r} is not a directory: expected a folder with "
                           f"{{domain}}/{{class}}/ images and {{domain}}_train.txt / {{domain}}_test.txt")
    samples: list[Sample] = []
    for domain in domains:
        if domain not in DOMAINS:
            raise ClipgenError(f"unknown domain {domain!r}: expected one of {', '.join(DOMAINS)}")
        for split in SPLITS:
            samples.extend(read_split_file(root, domain, split, check_files=check_files))
    check_duplicates(samples)
    if require_all_classes:
        check_all_classes(samples, domains)
    return carve_validation(samples, val_fraction, val_seed)
