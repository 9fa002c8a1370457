"""Build the source indexes a config asks for: DomainNet-layout samples and the natural base corpus."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from clipgen import layout
from clipgen.data.cache import cached_index
from clipgen.data.cc import expand_shards, read_cc_shards
from clipgen.data.domainnet import SPLITS, read_domainnet
from clipgen.data.imagenet_captions import read_imagenet_captions, read_imagenet_sketch
from clipgen.data.index import Sample
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS
from clipgen.preflight import check_data_keys


def domainnet_root(cfg: DictConfig) -> Path:
    check_data_keys(cfg)  # a DomainNet root given while the source is the world is an error, not ignored
    if cfg.data.source == "world":
        return layout.world_dir(cfg) / "domainnet"
    if cfg.data.source == "domainnet":
        if not cfg.data.domainnet_root:
            raise ClipgenError("data.domainnet_root is not set: expected the DomainNet directory")
        return Path(cfg.data.domainnet_root).expanduser()
    raise ClipgenError(f"unknown data.source {cfg.data.source!r}: expected 'world' or 'domainnet'")


def _cache_dir(cfg: DictConfig) -> Path | None:
    return layout.cache_dir(cfg) if cfg.data.index_cache else None


def domainnet_index(cfg: DictConfig, check_files: bool = True) -> list[Sample]:
    """DomainNet-layout samples (train, val, test), plus ImageNet-Sketch's train sketches when
    data.use_imagenet_sketch=true. Real DomainNet must hold every class in every domain unless
    data.allow_missing_classes=true (the world may be any subset). Reads only: a synthetic world must exist
    (clipgen.world.generate.ensure_world, called by whoever needs it built)."""
    strict = cfg.data.source == "domainnet" and not cfg.data.allow_missing_classes
    root = domainnet_root(cfg)
    params = {"root": str(root), "val_fraction": float(cfg.data.val_fraction), "val_seed": int(cfg.data.val_seed),
              "check_files": bool(check_files), "require_all_classes": bool(strict)}
    samples = cached_index(_cache_dir(cfg), "domainnet", params,
                           [root / f"{d}_{split}.txt" for d in DOMAINS for split in SPLITS],
                           lambda: read_domainnet(root, val_fraction=params["val_fraction"],
                                                  val_seed=params["val_seed"], check_files=check_files,
                                                  require_all_classes=strict))
    if cfg.data.use_imagenet_sketch:
        if not cfg.data.imagenet_sketch_root:
            raise ClipgenError("data.use_imagenet_sketch=true needs data.imagenet_sketch_root: expected the "
                               "ImageNet-Sketch folder ({wnid}/{file})")
        samples = samples + read_imagenet_sketch(cfg.data.imagenet_sketch_root, {s.class_name for s in samples})
    return samples


def base_index(cfg: DictConfig) -> list[Sample]:
    check_data_keys(cfg)
    base = cfg.data.base
    if base == "none":
        return []
    if base == "world":
        nat = layout.world_dir(cfg) / "natural"
        return _captions_index(cfg, nat / "imagenet_captions.json", nat / "train", "world_base")
    if base == "imagenet_captions":
        if not cfg.data.imagenet_captions_json or not cfg.data.imagenet_train_root:
            raise ClipgenError("data.base=imagenet_captions needs data.imagenet_captions_json and "
                               "data.imagenet_train_root")
        return _captions_index(cfg, Path(cfg.data.imagenet_captions_json), Path(cfg.data.imagenet_train_root),
                               "imagenet_captions")
    if base == "cc":
        pattern = cfg.data.cc_shards
        return cached_index(_cache_dir(cfg), "cc", {"cc_shards": str(pattern)}, expand_shards(pattern),
                            lambda: read_cc_shards(pattern))
    raise ClipgenError(f"unknown data.base {base!r}: expected world, imagenet_captions, cc or none")


def _captions_index(cfg: DictConfig, json_path: Path, train_root: Path, source: str) -> list[Sample]:
    return cached_index(_cache_dir(cfg), source, {"json": str(json_path), "train_root": str(train_root),
                                                  "source": source}, [json_path],
                        lambda: read_imagenet_captions(json_path, train_root, source=source))
