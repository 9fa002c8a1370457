"""The one index format every source is read into, so recipes never care where pixels come from."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class Sample:
    sample_id: str  # stable id: DomainNet "domain/ClassFolder/file" without extension; base "base/wnid/file"
    path: str  # absolute path of the image file
    domain: str  # DomainNet domain, or "natural" for base-corpus pairs
    class_name: str  # caption spelling ("aircraft carrier")
    label: int  # DomainNet label (index in the 345-class list); -1 for base classes without one
    split: str  # train | val | test
    source: str  # domainnet | imagenet_captions | world_base | cc
    caption: Optional[str] = None  # fixed caption (base corpus); DomainNet captions are made by recipes


def index_hash(samples: Iterable[Sample]) -> str:
    """sha256 over the ordered (sample id, split, label, path) of an index: changes when the source changes."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.sample_id}\t{s.split}\t{s.label}\t{s.path}\n".encode("utf-8"))
    return h.hexdigest()


def corpus_hash(samples: Iterable[Sample]) -> str:
    """sha256 over the ordered (sample id, split, label, path, caption) of a base corpus: its identity (which
    pairs, with which captions, from which files)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.sample_id}\t{s.split}\t{s.label}\t{s.path}\t{s.caption}\n".encode("utf-8"))
    return h.hexdigest()


def sample_ids_hash(ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()
