"""Hashes that name things: short spec hashes of JSON-serialisable objects (worlds, recipes, caches) and file
checksums (manifests, checkpoints)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def stable_hash(obj: Any, n: int = 12) -> str:
    """Short sha256 of a JSON-serialisable object with sorted keys (spec hashes of worlds and recipes)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:n]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
