"""Build recipes: plan -> shards + sizes.json + manifest.json, atomically, into a directory named by the spec hash.

Rebuilding an unchanged recipe does nothing; a changed spec (data, held-out classes, captions, image size ...)
hashes to a new directory, so finished work is never overwritten. The base corpus is sharded once into
``recipes/base-{hash}`` and referenced from every recipe's manifest.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipgen import layout
from clipgen.data.cache import derived
from clipgen.data.index import Sample, index_hash, sample_ids_hash
from clipgen.data.sources import base_index, domainnet_index, domainnet_root
from clipgen.errors import ClipgenError
from clipgen.facts import domainnet_label
from clipgen.recipes.captions import make_caption
from clipgen.recipes.naming import RecipeSpec, recipe_spec
from clipgen.recipes.plan import Plan, check_no_leak, format_plan, plan_recipe, train_index
from clipgen.recipes.shards import count_shard_samples, write_shards
from clipgen.world.generate import ensure_world
from clipgen.utils import (atomic_write_json, git_sha, is_disk_error, read_json, stable_hash, sweep_stale_dirs,
                           write_error)

RECIPE_FORMAT_VERSION = 1


def _check_heldout(names) -> list[str]:
    out = []
    for name in names:
        try:
            domainnet_label(name)
        except ValueError as e:
            raise ClipgenError(f"heldout.classes: {e}") from None
        out.append(name)
    return out


def _publish(tmp: Path, final: Path) -> bool:
    """Move a finished build into place; False if another process published the same spec first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if (final / "manifest.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def _write_dir(final: Path, samples: list[Sample], captions: list[str], cfg: DictConfig,
               manifest: dict) -> dict:
    """Shards + sizes.json + manifest.json into a temporary sibling, verified, then renamed into place."""
    r = cfg.recipe
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_dirs(final.parent, ".*.tmp-*")  # builds of killed runs (judged by age: shared roots)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        sizes = write_shards(tmp, samples, captions, r.image_px, r.image_format, r.shard_size, r.min_shards)
        written = {name: count_shard_samples(tmp / name) for name in sizes}
        if written != sizes or sum(written.values()) != len(samples):
            raise ClipgenError(f"recipe {final.name}: wrote {sum(written.values())} samples but planned "
                               f"{len(samples)}; nothing was published")
        manifest = {**manifest, "num_samples": len(samples), "shards": sizes,
                    "sample_ids_hash": sample_ids_hash(s.sample_id for s in samples)}
        atomic_write_json(tmp / "sizes.json", sizes)
        atomic_write_json(tmp / "manifest.json", manifest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_error(e):  # a full disk: one line naming the recipe and the space left
            raise write_error(final, e, "recipe") from None
        raise
    _publish(tmp, final)
    return read_json(final / "manifest.json", "recipe manifest")


def _shuffled(items: list, seed) -> list:
    """Shard order is a seeded permutation so that shard-level readers (open_clip's trainer) see mixed data."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]


def ensure_base(cfg: DictConfig) -> dict | None:
    """Shard the base corpus once; returns its manifest (None when data.base=none)."""
    samples = base_index(cfg)
    if not samples:
        return None
    r = cfg.recipe
    src_hash = derived(samples, "index_hash", index_hash)
    spec = {"source_index_hash": src_hash, "image_px": r.image_px, "image_format": r.image_format,
            "shard_size": r.shard_size, "min_shards": r.min_shards, "version": RECIPE_FORMAT_VERSION}
    final = layout.recipes_root(cfg) / f"base-{stable_hash(spec, 10)}"
    if (final / "manifest.json").is_file():
        return read_json(final / "manifest.json", "base manifest")
    # The order depends on the sample ids only, not on where the files live.
    samples = _shuffled(samples, "base:" + sample_ids_hash(s.sample_id for s in samples))
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.class_name] = counts.get(s.class_name, 0) + 1
    manifest = {"kind": "base", "spec": spec, "source": cfg.data.base, "source_index_hash": src_hash,
                "counts": {"natural": counts}, "image_px": r.image_px, "image_format": r.image_format,
                "git_sha": git_sha(), "dir": final.name}
    return _write_dir(final, samples, [s.caption or "" for s in samples], cfg, manifest)


def _recipe_spec_dict(spec: RecipeSpec, cfg: DictConfig, src_hash: str, heldout: list[str]) -> dict:
    r = cfg.recipe
    return {"recipe_id": spec.recipe_id, "kind": spec.kind, "test_domain": spec.test_domain,
            "domains": list(spec.domains), "heldout_keep": spec.heldout_keep, "size_matched": spec.size_matched,
            "aligned_captions": spec.aligned_captions, "subsample": spec.subsample, "seed": spec.seed,
            "caption_seed": r.caption_seed, "heldout_classes": heldout, "image_px": r.image_px,
            "image_format": r.image_format, "shard_size": r.shard_size, "min_shards": r.min_shards,
            "source_index_hash": src_hash, "base": cfg.data.base, "version": RECIPE_FORMAT_VERSION}


def plan_from_config(cfg: DictConfig) -> tuple[Plan, list[Sample]]:
    spec = recipe_spec(cfg.recipe)
    heldout = _check_heldout(cfg.heldout.classes)
    ensure_world(cfg)  # the recipe stage builds the world it reads (readers never do)
    index = domainnet_index(cfg)
    plan = plan_recipe(spec, derived(index, "train_index", train_index), heldout)
    check_no_leak(plan)
    return plan, index


def ensure_recipe(cfg: DictConfig) -> Path:
    """Build the config's recipe if it is not built yet; return its directory."""
    return Path(build_recipe(cfg)["recipe_dir"])


def build_recipe(cfg: DictConfig) -> dict:
    t0 = time.time()
    plan, index = plan_from_config(cfg)
    spec = plan.spec
    src_hash = derived(index, "index_hash", index_hash)
    spec_dict = _recipe_spec_dict(spec, cfg, src_hash, list(plan.heldout))
    final = layout.recipes_root(cfg) / f"{spec.recipe_id}-{stable_hash(spec_dict, 10)}"
    summary = {"recipe_id": spec.recipe_id, "recipe_dir": str(final), "num_samples": plan.size,
               "target_size": plan.target_size}
    if cfg.recipe.dry_run:
        print(format_plan(plan))
        print(f"dry run: would write {plan.size} samples to {final}")
        return {**summary, "dry_run": True, "built": False}
    if (final / "manifest.json").is_file():
        return {**summary, "built": False, "seconds": time.time() - t0}
    base = ensure_base(cfg)
    samples = _shuffled(plan.samples, f"{spec.recipe_id}:{cfg.recipe.caption_seed}:{spec.seed}")
    caption_seed = int(cfg.recipe.caption_seed)  # read once: OmegaConf access per sample is slow
    captions = [make_caption(caption_seed, s.sample_id, s.domain, s.class_name, spec.aligned_captions)
                for s in samples]
    labels = sorted({(s.label, s.class_name) for s in index})
    val = [s for s in index if s.split == "val" and s.domain in spec.domains
           and not (s.domain == spec.test_domain and s.class_name in plan.heldout and spec.heldout_keep == 0)]
    manifest = {
        "recipe_id": spec.recipe_id, "kind": spec.kind, "test_domain": spec.test_domain,
        "domains": list(spec.domains), "spec": spec_dict, "seed": spec.seed,
        "caption_seed": cfg.recipe.caption_seed, "aligned_captions": spec.aligned_captions,
        "classes": [c for _, c in labels], "labels": [lab for lab, _ in labels],
        "heldout_classes": list(plan.heldout), "target_size": plan.target_size, "counts": plan.counts(),
        "val": {"num_samples": len(val), "sample_ids_hash": sample_ids_hash(s.sample_id for s in val)},
        "base": None if base is None else {"dir": f"../{base['dir']}", "num_samples": base["num_samples"],
                                           "shards": base["shards"]},
        "source": {"data_source": cfg.data.source, "domainnet_root": str(domainnet_root(cfg)),
                   "base": cfg.data.base},
        "source_index_hash": src_hash, "image_px": cfg.recipe.image_px, "image_format": cfg.recipe.image_format,
        "git_sha": git_sha(), "config": OmegaConf.to_container(cfg.recipe, resolve=True),
    }
    _write_dir(final, samples, captions, cfg, manifest)
    return {**summary, "built": True, "seconds": time.time() - t0}


def run_recipe(cfg: DictConfig) -> dict:
    out = build_recipe(cfg)
    if not out.get("dry_run"):
        state = "built" if out["built"] else "already built"
        print(f"recipe {out['recipe_id']}: {out['num_samples']} samples, {state} -> {out['recipe_dir']}")
    return out
