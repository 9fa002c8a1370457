"""open_clip model factory: built-in configs plus the tiny CPU models shipped in clipgen/resources/models."""
from __future__ import annotations

import contextlib
import logging
import os
from importlib import resources
from pathlib import Path

from clipgen.errors import ClipgenError


def register_clipgen_models() -> str:
    """Make open_clip know clipgen's model configs (``clipgen-tiny-rn`` ...) and their tokenizers. Call it before
    ``open_clip.create_model_and_transforms(name, pretrained=path)`` or ``open_clip.get_tokenizer(name)`` on a
    clipgen model elsewhere. Returns the config folder.

    The tiny models' configs name their compact vocabulary by file name (``text_cfg.tokenizer_kwargs.bpe_path``,
    see clipgen.models.vocab); open_clip's tokenizer opens that path as given, so it is made absolute here (again
    after anything rescans open_clip's registry)."""
    import open_clip
    from open_clip import factory

    folder = resources.files("clipgen.resources").joinpath("models")
    names = [p.name[:-len(".json")] for p in folder.iterdir() if p.name.endswith(".json")]
    if any(n not in factory._MODEL_CONFIGS for n in names):
        open_clip.add_model_config(str(folder))
    for n in names:
        kwargs = factory._MODEL_CONFIGS[n]["text_cfg"].get("tokenizer_kwargs") or {}
        if "bpe_path" in kwargs and not os.path.isabs(kwargs["bpe_path"]):
            kwargs["bpe_path"] = str(resources.files("clipgen.resources").joinpath(kwargs["bpe_path"]))
    return str(folder)


def shipped_config(name: str) -> dict | None:
    """A model config as shipped in a file (clipgen's resources, else open_clip's ``model_configs/``), read without
    importing open_clip (~3 s): a preflight check can refuse a config at once. None when no such file exists."""
    import importlib.util
    import json

    if "/" in name:  # hf-hub:org/model and the like: not a shipped file
        return None
    spec = importlib.util.find_spec("open_clip")
    folders = [resources.files("clipgen.resources").joinpath("models")]
    folders += [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    for folder in folders:
        path = folder.joinpath(f"{name}.json")
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def model_config(name: str) -> dict:
    """open_clip's config of ``name``, as shipped (a compact vocabulary named by file name, so the copy a
    checkpoint and meta.json record is the same on every machine)."""
    import open_clip

    register_clipgen_models()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ClipgenError(f"unknown model.name {name!r}: expected an open_clip model config such as RN50, "
                           f"ViT-B-32 or one of clipgen's tiny models (clipgen-tiny-rn, clipgen-tiny-vit)")
    kwargs = cfg["text_cfg"].get("tokenizer_kwargs") or {}
    if "bpe_path" in kwargs:
        kwargs["bpe_path"] = os.path.basename(kwargs["bpe_path"])
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


# torch.nn.init's in-place initialisers: what modules call (directly or from reset_parameters) to draw weights.
INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def weights_to_be_loaded():
    """Build models whose weights a checkpoint overwrites at once: inside, torch.nn.init's initialisers leave the
    (uninitialised) tensors as they are, so building an RN50 to load a checkpoint into takes ~0.1 s instead of
    ~0.9 s of drawing random weights that ``load_state_dict(strict=True)`` then replaces. Buffers a state_dict does
    not hold (open_clip's attention mask) are not drawn by torch.nn.init and are built as usual. Never use it for
    a model that is trained or evaluated from its initial weights."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in INITIALISERS if hasattr(init, name)}
    for name in saved:
        setattr(init, name, _leave_as_is)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _leave_as_is(tensor, *args, **kwargs):
    return tensor


def get_tokenizer(name: str):
    """open_clip's tokenizer of model ``name`` (clipgen's models included)."""
    import open_clip

    register_clipgen_models()
    return open_clip.get_tokenizer(name)


class NamedTokenizer:
    """A model's tokenizer that pickles as the model's name: a DataLoader worker started through a fork server
    receives a few bytes instead of the tokenizer's vocabulary and merges (2 MB for RN50's) and makes its own."""

    def __init__(self, name: str, tokenizer=None):
        self.name, self._tokenizer = str(name), tokenizer

    def __call__(self, texts, *args, **kwargs):
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.name)
        return self._tokenizer(texts, *args, **kwargs)

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state):
        self.__init__(state["name"])
