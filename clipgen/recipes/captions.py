"""Captions for DomainNet-layout images (protocol §3).

Each caption is a pure function of (caption seed, sample id, domain, class): a sample gets the same caption in
every recipe that contains it, and a recipe's captions are reproducible from its seed. Aligned captions draw the
term only from the neutral pair, so no caption names a domain.
"""
from __future__ import annotations

import hashlib
import random

from clipgen.facts import CAPTION_TEMPLATES, DOMAIN_TERMS, NEUTRAL_TERMS


def caption_terms(domain: str, aligned: bool) -> tuple[str, ...]:
    return NEUTRAL_TERMS if aligned else NEUTRAL_TERMS + DOMAIN_TERMS[domain]


def make_caption(seed: int, sample_id: str, domain: str, class_name: str, aligned: bool = False) -> str:
    digest = hashlib.sha256(f"{seed}|{sample_id}".encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    template = rng.choice(CAPTION_TEMPLATES)
    term = rng.choice(caption_terms(domain, aligned))
    art = "an " if term[0] in "aeiou" else "a "
    text = template.format(art=art, term=term, cls=class_name)
    if rng.random() < 0.5:  # the final "." is kept with p = 0.5
        text += "."
    return text
