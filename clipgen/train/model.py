"""open_clip model factory: built-in configs plus the tiny CPU models shipped in clipgen/resources/models."""
from __future__ import annotations

import logging
from functools import lru_cache
from importlib import resources

from clipgen.errors import ClipgenError


@lru_cache(maxsize=None)
def register_clipgen_models() -> str:
    """Make open_clip know clipgen's model configs (``clipgen-tiny-rn`` ...). Returns the config folder, which is
    what a user passes to ``open_clip.add_model_config`` before loading a clipgen checkpoint elsewhere."""
    import open_clip

    folder = str(resources.files("clipgen.resources").joinpath("models"))
    open_clip.add_model_config(folder)
    return folder


def model_config(name: str) -> dict:
    import open_clip

    register_clipgen_models()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ClipgenError(f"unknown model.name {name!r}: expected an open_clip model config such as RN50, "
                           f"ViT-B-32 or one of clipgen's tiny models (clipgen-tiny-rn, clipgen-tiny-vit)")
    return cfg


def create_clip(name: str, image_px: int | None = None):
    """Randomly initialised open_clip CLIP model and its tokenizer (nothing is downloaded)."""
    import open_clip

    cfg = model_config(name)
    native = cfg["vision_cfg"]["image_size"]
    if image_px is not None and image_px != native:
        raise ClipgenError(f"model.image_px={image_px} does not match {name}'s image_size {native}: "
                           f"set model.image_px={native} (and recipe.image_px to match)")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights" at every build: random init is intended
    try:
        model = open_clip.create_model(name, pretrained=None, output_dict=True)
        tokenizer = open_clip.get_tokenizer(name)
    finally:
        root.setLevel(level)
    return model, tokenizer
