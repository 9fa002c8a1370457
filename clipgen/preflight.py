"""Cross-key checks of a composed config, run before anything is generated, built or trained.

Hydra's schema checks every key on its own; these check keys against each other, where a mismatch would otherwise
surface late (a study builds all of its recipes, then every training job fails) or never (a dataset path that
the chosen source does not read). Each failure is one ClipgenError line naming the keys, their values and what
was expected.
"""
from __future__ import annotations

from functools import lru_cache

from omegaconf import DictConfig, OmegaConf

from clipgen.errors import ClipgenError

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
    check_data_keys(cfg)
    check_image_sizes(cfg)
