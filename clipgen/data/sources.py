"""Build the source indexes a config asks for: DomainNet-layout samples and the natural base corpus."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from clipgen import layout
from clipgen.data.cache import cached_digest, cached_index
from clipgen.data.cc import expand_shards, read_cc_shards
from clipgen.data.domainnet import SPLITS, read_domainnet
from clipgen.data.imagenet_captions import read_imagenet_captions, read_imagenet_sketch
from clipgen.data.index import Sample, corpus_hash
from clipgen.hashing import stable_hash
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


def _base_reader(cfg: DictConfig) -> tuple[str, dict, list[Path], Callable[[], list[Sample]]] | None:
    """(cache name, reader parameters, input files, read function) of the configured base corpus; None for
    data.base=none. A missing input is a ClipgenError here already (brace patterns are expanded)."""
    check_data_keys(cfg)
    base = cfg.data.base
    if base == "none":
        return None
    if base == "world":
        nat = layout.world_dir(cfg) / "natural"
        return _captions_reader(nat / "imagenet_captions.json", nat / "train", "world_base")
    if base == "imagenet_captions":
        if not cfg.data.imagenet_captions_json or not cfg.data.imagenet_train_root:
            raise ClipgenError("data.base=imagenet_captions needs data.imagenet_captions_json and "
                               "data.imagenet_train_root")
        json_path = Path(cfg.data.imagenet_captions_json)
        if not json_path.is_file():
            raise ClipgenError(f"data.imagenet_captions_json={str(json_path)!r} does not exist: expected "
                               "ImageNet-Captions' imagenet_captions.json")
        return _captions_reader(json_path, Path(cfg.data.imagenet_train_root), "imagenet_captions")
    if base == "cc":
        pattern = cfg.data.cc_shards
        return "cc", {"cc_shards": str(pattern)}, expand_shards(pattern), lambda: read_cc_shards(pattern)
    raise ClipgenError(f"unknown data.base {base!r}: expected world, imagenet_captions, cc or none")


def base_index(cfg: DictConfig) -> list[Sample]:
    """The base corpus's samples ([] for data.base=none)."""
    reader = _base_reader(cfg)
    return [] if reader is None else cached_index(_cache_dir(cfg), *reader)


def base_digest(cfg: DictConfig) -> dict | None:
    """``{"digest": ..., "num_samples": n}`` identifying the base corpus (None for data.base=none): the hash of its
    pairs (ids, files, captions; clipgen.data.index.corpus_hash) and, for CC shards, of their names and sizes (a
    corpus regenerated at the same paths). Read from the index cache's side file when this corpus was read
    before: a ``stat`` per input file."""
    reader = _base_reader(cfg)
    if reader is None:
        return None
    out = cached_digest(_cache_dir(cfg), *reader, corpus_hash)
    if reader[0] == "cc":
        out = {**out, "digest": stable_hash([out["digest"], [[p.name, p.stat().st_size] for p in reader[2]]], 32)}
    return out


def _captions_reader(json_path: Path, train_root: Path, source: str):
    return (source, {"json": str(json_path), "train_root": str(train_root), "source": source}, [json_path],
            lambda: read_imagenet_captions(json_path, train_root, source=source))
