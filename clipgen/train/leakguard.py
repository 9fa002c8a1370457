"""The load-time leak guard: no test-split sample and no held-out class of the test domain in training shards.

A shard's ``.json`` fields could be wrong (a hand-edited or foreign shard, a bug in a writer), so the guard does
not trust ``domain`` and ``class_name`` alone: it derives them from the ``sample_id`` (FORMATS.md: DomainNet
``{domain}/{ClassFolder}/{stem}``, ImageNet-Sketch ``imagenet_sketch/{wnid}/{stem}``, base corpus ``base/...`` and
``cc/...``), requires the metadata to agree, and applies the held-out rule to what the id says.
"""
from __future__ import annotations

from functools import lru_cache

from clipgen.data.imagenet_captions import SKETCH_SOURCE, wnid_table
from clipgen.errors import ClipgenError
from clipgen.facts import BASE_DOMAIN, DOMAINS, class_name_from_folder, domainnet_classes

BASE_PREFIXES = ("base", "cc")


@lru_cache(maxsize=None)
def _sketch_classes() -> dict[str, str]:
    """ImageNet wnid -> the DomainNet class its ImageNet-Sketch samples are read as (clipgen.data)."""
    names = domainnet_classes()
    return {w: names[label] for w, (_, label) in wnid_table().items() if label >= 0}


def identity(sample_id: str) -> tuple[str, frozenset[str] | None]:
    """(domain, the class names the id allows, or None where the id does not fix the class: base corpus) of a
    sample id; ValueError when the id has none of the forms of FORMATS.md."""
    parts = sample_id.split("/")
    if len(parts) >= 3 and all(parts):
        head = parts[0]
        if head in DOMAINS and len(parts) == 3:
            return head, frozenset([class_name_from_folder(parts[1])])
        if head == SKETCH_SOURCE:
            known = _sketch_classes().get(parts[1])
            return "sketch", frozenset([known] if known else [])
        if head in BASE_PREFIXES:
            return BASE_DOMAIN, None
    raise ValueError(f"expected {{domain}}/{{ClassFolder}}/{{stem}}, {SKETCH_SOURCE}/{{wnid}}/{{stem}}, base/... or "
                     "cc/... (clipgen/FORMATS.md)")


def check_sample(meta: dict, key: str, shard: str, guard: dict) -> None:
    """Nothing from a test split, the metadata agree with the sample id, and no held-out class of the test
    domain unless the recipe is a pseudo/allow recipe that keeps them by design."""
    sid = meta.get("sample_id", key)
    if meta.get("split") == "test":
        raise ClipgenError(f"leak: sample {sid!r} in shard {shard!r} has split 'test': expected only train "
                           "samples in training shards")
    try:
        domain, classes = identity(str(sid))
    except ValueError as e:
        raise ClipgenError(f"leak guard: sample {key!r} in shard {shard!r} has sample_id {sid!r}: {e}") from None
    if meta.get("domain") != domain:
        raise ClipgenError(f"leak guard: sample {sid!r} in shard {shard!r} has .json domain "
                           f"{meta.get('domain')!r}, but its sample_id says {domain!r}: expected them to agree")
    if classes is not None and meta.get("class_name") not in classes:
        raise ClipgenError(f"leak guard: sample {sid!r} in shard {shard!r} has .json class_name "
                           f"{meta.get('class_name')!r}, but its sample_id says "
                           f"{' or '.join(map(repr, sorted(classes))) or 'an unknown class'}: expected them to agree")
    if not guard["allow_heldout"] and domain == guard["test_domain"] and meta.get("class_name") in guard["heldout"]:
        raise ClipgenError(f"leak: sample {sid!r} in shard {shard!r} is held-out class "
                           f"{meta.get('class_name')!r} of test domain {domain!r}: expected none in a "
                           f"{guard['kind']!r} recipe")
