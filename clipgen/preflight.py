"""Cross-key checks of a composed config, run before anything is generated, built or trained.

Hydra's schema checks every key on its own; these check keys against each other, where a mismatch would otherwise
surface late (a study builds all of its recipes, then every training job fails) or never (a dataset path that
the chosen source does not read). Each failure is one ClipgenError line naming the keys, their values and what
was expected.
"""
from __future__ import annotations

import math
from functools import lru_cache

from omegaconf import DictConfig, OmegaConf

from clipgen.errors import ClipgenError

# Values the schema's types accept but no run can use (torch would raise deep inside, or a run name would read
# "--seed-1"): what each key must be, checked before anything is built. Range checks of one key live here and
# only here; checks between keys follow below.
_RANGES = {
    "positive integer": lambda v: _is_int(v) and v >= 1,
    "integer >= 0": lambda v: _is_int(v) and v >= 0,
    "positive number": lambda v: _is_num(v) and v > 0,
    "number >= 0": lambda v: _is_num(v) and v >= 0,
    "number in [0, 1)": lambda v: _is_num(v) and 0 <= v < 1,
    "-1 (the full schedule) or a positive integer": lambda v: _is_int(v) and (v == -1 or v >= 1),
    "-1 (the last) or an epoch >= 0": lambda v: _is_int(v) and v >= -1,
    "integer in [1, 100]": lambda v: _is_int(v) and 1 <= v <= 100,
    "positive integer, or null for every core": lambda v: v is None or (_is_int(v) and v >= 1),
}
_VALUE_KEYS = {
    "trainer": (("seed", "integer >= 0"), ("epochs", "positive integer"), ("batch_size", "positive integer"),
                ("threads", "integer >= 0"), ("log_every", "positive integer"),
                ("save_every_steps", "positive integer"), ("accum_steps", "positive integer"),
                ("save_every_epochs", "positive integer"),
                ("max_steps", "-1 (the full schedule) or a positive integer")),
    "optim": (("lr", "positive number"), ("weight_decay", "number >= 0"), ("warmup_steps", "integer >= 0"),
              ("beta1", "number in [0, 1)"), ("beta2", "number in [0, 1)"), ("eps", "number >= 0"),
              ("momentum", "number >= 0"), ("gamma", "positive number"), ("milestones", "integer >= 0")),
    "data": (("workers", "integer >= 0"), ("val_fraction", "number in [0, 1)"), ("val_seed", "integer >= 0"),
             ("max_memory_gb", "positive number")),
    "recipe": (("seed", "integer >= 0"), ("caption_seed", "integer >= 0"), ("shard_size", "positive integer"),
               ("min_shards", "positive integer"), ("jpeg_quality", "integer in [1, 100]"),
               ("workers", "positive integer, or null for every core")),
    "eval": (("batch_size", "positive integer"), ("max_templates", "integer >= 0"),
             ("subset_per_class", "positive integer")),
    "study": (("seeds", "integer >= 0"), ("parallel", "positive integer")),
    "export": (("epoch", "-1 (the last) or an epoch >= 0"),),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_values(cfg: DictConfig, sections=tuple(_VALUE_KEYS)) -> None:
    """Every numeric key of ``sections`` within what a run can use (a list key: every entry), else one
    ClipgenError naming the key as the user types it, its value and what was expected."""
    for section in sections:
        node = cfg.get(section)
        for key, expected in _VALUE_KEYS[section] if node is not None else ():
            if key not in node or OmegaConf.is_missing(node, key):
                continue
            value = node[key]
            items = list(enumerate(value)) if OmegaConf.is_list(value) else [(None, value)]
            for i, v in items:
                if not _RANGES[expected](v):
                    where = f"{section}.{key}" if i is None else f"{section}.{key}[{i}]"
                    whole = "" if i is None else f" (in {section}.{key}={list(value)})"
                    raise ClipgenError(f"{where}={v}{whole}: expected {_article(expected)}{expected}")


def _article(what: str) -> str:
    return "" if what[0] in "-0123456789" else "an " if what[0] in "aeiou" else "a "


def check_study_grid(cfg: DictConfig) -> None:
    """study.test_domains named as the user typed them (each becomes a job's recipe.test_domain later)."""
    from clipgen.facts import TEST_DOMAINS

    for i, d in enumerate(cfg.study.test_domains):
        if d not in TEST_DOMAINS:
            raise ClipgenError(f"study.test_domains[{i}]={d!r} (in study.test_domains={list(cfg.study.test_domains)}"
                               f"): expected one of {', '.join(TEST_DOMAINS)} (never real)")


# Dataset keys and the setting under which each is read; given otherwise, the user meant something else.
_DATA_KEYS = (
    ("domainnet_root", lambda d: d.source == "domainnet", "data.source=domainnet (add data=domainnet)"),
    ("imagenet_captions_json", lambda d: d.base == "imagenet_captions",
     "data.base=imagenet_captions (add data=domainnet)"),
    ("imagenet_train_root", lambda d: d.base == "imagenet_captions",
     "data.base=imagenet_captions (add data=domainnet)"),
    ("cc_shards", lambda d: d.base == "cc", "data.base=cc (add data=domainnet_cc)"),
    ("imagenet_sketch_root", lambda d: bool(d.get("use_imagenet_sketch")), "data.use_imagenet_sketch=true"),
)


def check_data_keys(cfg: DictConfig) -> None:
    """A dataset path given while the source that reads it is not selected is an error, never ignored (without
    data=domainnet, data.domainnet_root=... would otherwise train on the synthetic world)."""
    d = cfg.data
    for key, used, needs in _DATA_KEYS:
        value = None if OmegaConf.is_missing(d, key) else d.get(key)  # ??? (data=domainnet's unset paths) = unset
        if value not in (None, "") and not used(d):
            raise ClipgenError(f"data.{key}={value} is set but not read with data.source={d.source}, "
                               f"data.base={d.base}: expected {needs}, or leave data.{key} unset")


def uses_world(cfg: DictConfig) -> bool:
    return cfg.data.source == "world" or cfg.data.base == "world"


@lru_cache(maxsize=None)
def native_image_size(model_name: str) -> int | None:
    """The input size in open_clip's config of a model (an unknown name is a ClipgenError)."""
    from clipgen.models.factory import model_config, shipped_config

    cfg = shipped_config(model_name) or model_config(model_name)  # the file when there is one: no open_clip import
    size = cfg.get("vision_cfg", {}).get("image_size")
    if size is None:
        return None
    return int(size if isinstance(size, int) else size[0])


def check_image_sizes(cfg: DictConfig) -> None:
    """One size from the model to the disk: model.image_px is the model config's input size, recipes are written
    at it, and a world that is read is stored at it."""
    m_px, r_px = int(cfg.model.image_px), int(cfg.recipe.image_px)
    native = native_image_size(str(cfg.model.name))
    if native is not None and m_px != native:
        raise ClipgenError(f"model.image_px={m_px} does not match model.name={cfg.model.name}'s input size "
                           f"{native}: expected model.image_px={native}")
    if r_px != m_px:
        raise ClipgenError(f"recipe.image_px={r_px} does not match model.image_px={m_px} "
                           f"(model.name={cfg.model.name}): expected recipe.image_px={m_px}, or leave it unset "
                           "(it follows the model)")
    if uses_world(cfg) and int(cfg.world.image_px) != r_px:
        raise ClipgenError(f"world.image_px={cfg.world.image_px} does not match recipe.image_px={r_px}: expected "
                           f"world.image_px={r_px}, or leave it unset (it follows the model)")


def check_run_config(cfg: DictConfig) -> None:
    """Everything a training / evaluation / study config must agree on before the first recipe is built."""
    check_values(cfg)
    check_data_keys(cfg)
    check_image_sizes(cfg)
