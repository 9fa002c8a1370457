"""Facts of the study, defined once and imported everywhere.

Domains, DomainNet's class list, caption vocabulary and zero-shot templates live here. The held-out class set
(C2) is *not* here: it is experiment configuration and lives in ``conf/heldout/``.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

# DomainNet's six domains in the fixed order that gives their ids 0..5 and the letters of recipe ids.
DOMAINS: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAIN_LETTERS: dict[str, str] = {d: d[0] for d in DOMAINS}  # c i p q r s
NATURAL_DOMAIN = "real"
TEST_DOMAINS: tuple[str, ...] = tuple(d for d in DOMAINS if d != NATURAL_DOMAIN)
# Domain label of base-corpus samples (ImageNet-Captions / CC pairs); not a DomainNet domain.
BASE_DOMAIN = "natural"

# Caption terms (protocol §3): neutral terms every caption may use, plus each domain's own pair.
NEUTRAL_TERMS: tuple[str, ...] = ("image", "picture")
DOMAIN_TERMS: dict[str, tuple[str, str]] = {
    "clipart": ("clipart", "illustration"),
    "infograph": ("infograph", "informational chart"),
    "painting": ("painting", "art"),
    "quickdraw": ("quickdraw", "doodle"),
    "real": ("photo", "snapshot"),
    "sketch": ("sketch", "drawing"),
}
# The six caption forms; {art} is "a " or "an " chosen by the term that follows it.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{art}{term} of a {cls}",
    "a {cls} {term}",
    "{art}{term} depicting a {cls}",
    "a {cls} depicted in {art}{term}",
    "{art}{term} showing a {cls}",
    "a {cls} is visible in {art}{term}",
)
PAPER_CAPTION_SEED = 42

# The format recipes are written in (recipe.image_format=auto), by data.source: the synthetic world's small
# drawings stay lossless PNG; recipes of real photos (DomainNet, ImageNet-Captions, CC) are JPEG at
# recipe.jpeg_quality, ~3.5x smaller and ~5x faster to decode than PNG at 224 px (README, Training data).
RECIPE_IMAGE_FORMAT: dict[str, str] = {"world": "png", "domainnet": "jpg"}
RECIPE_IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg")
DEFAULT_JPEG_QUALITY = 95  # PIL's quality scale; PIL's default 4:2:0 chroma subsampling


def recipe_image_format(fmt: str, source: str) -> str:
    """recipe.image_format with ``auto`` resolved by data.source; ValueError for anything else."""
    if fmt == "auto":
        return RECIPE_IMAGE_FORMAT[source]
    if fmt not in RECIPE_IMAGE_FORMATS:
        raise ValueError(f"invalid recipe.image_format {fmt!r}: expected {', '.join(RECIPE_IMAGE_FORMATS)} or auto")
    return fmt

# DomainNet folders that keep capitals; every other folder is the lower-case name with '_' for ' '.
_CASED_FOLDERS = {
    "the eiffel tower": "The_Eiffel_Tower",
    "the great wall of china": "The_Great_Wall_of_China",
    "the mona lisa": "The_Mona_Lisa",
}


def _resource_json(name: str):
    with resources.files("clipgen.resources").joinpath(name).open("r", encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def domainnet_classes() -> tuple[str, ...]:
    """DomainNet's 345 class names (captions' spelling) in label order, label = position."""
    return tuple(_resource_json("in_to_dn_mapping.json").keys())


@lru_cache(maxsize=None)
def domainnet_to_imagenet() -> dict[str, list[int] | None]:
    """DomainNet class name -> ImageNet class indices (None where no ImageNet class maps)."""
    return dict(_resource_json("in_to_dn_mapping.json"))


@lru_cache(maxsize=None)
def imagenet_class_index() -> dict[int, tuple[str, str]]:
    """ImageNet index -> (wnid, readable name)."""
    return {int(k): (v[0], v[1]) for k, v in _resource_json("imagenet_class_index.json").items()}


def class_folder(name: str) -> str:
    """DomainNet folder name of a class given its caption spelling."""
    return _CASED_FOLDERS.get(name, name.replace(" ", "_"))


def class_name_from_folder(folder: str) -> str:
    """Caption spelling of a class from its DomainNet folder name."""
    return folder.replace("_", " ").lower()


@lru_cache(maxsize=None)
def domainnet_label(name: str) -> int:
    """Label of a DomainNet class (by caption spelling or folder name); ValueError naming it if unknown."""
    lookup = {c: i for i, c in enumerate(domainnet_classes())}
    key = class_name_from_folder(name)
    if key not in lookup:
        raise ValueError(f"unknown DomainNet class {name!r}: expected one of the 345 names in "
                         f"clipgen/resources/in_to_dn_mapping.json (e.g. 'aircraft carrier', 'axe')")
    return lookup[key]


# --- zero-shot templates (protocol §6) -------------------------------------------------------------------------
def _openai_imagenet_templates() -> tuple[str, ...]:
    # The 80 templates of OpenAI's ImageNet zero-shot evaluation, as shipped by open_clip.
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


_DOMAIN_EXTRA_TEMPLATES = (
    "a clipart of the {}.", "a clipart of a {}.",
    "an infograph of the {}.", "an infograph of a {}.",
    "a quickdraw of the {}.", "a quickdraw of a {}.",
)

# Words that tie a template to a rendering style/domain; templates containing none of them are domain-free.
_DOMAIN_WORDS = ("photo", "sketch", "drawing", "drawn", "doodle", "painting", "art", "cartoon", "clipart",
                 "infograph", "quickdraw", "origami", "tattoo", "embroidered", "plastic", "plushie",
                 "sculpture", "rendering", "graffiti", "toy", "video game", "snapshot", "illustration")


@lru_cache(maxsize=None)
def zeroshot_templates(template_set: str = "paper86") -> tuple[str, ...]:
    """Zero-shot prompt templates: ``paper86`` (80 OpenAI + 6 domain ones) or ``domain_free`` (those naming no
    domain or rendering style, so the classifier is not biased toward any domain)."""
    all86 = _openai_imagenet_templates() + _DOMAIN_EXTRA_TEMPLATES
    if template_set == "paper86":
        return all86
    if template_set == "domain_free":
        import re

        pattern = re.compile(r"\b(" + "|".join(_DOMAIN_WORDS) + r")s?\b")
        return tuple(t for t in all86 if not pattern.search(t))
    raise ValueError(f"unknown eval.templates {template_set!r}: expected 'paper86' or 'domain_free'")
