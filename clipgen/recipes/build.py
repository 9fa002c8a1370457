"""Build recipes: plan -> shards + sizes.json + manifest.json + sample index, atomically, into a directory named by
the spec hash.

Rebuilding an unchanged recipe does nothing; a changed spec (data, held-out classes, captions, image size ...)
hashes to a new directory, so finished work is never overwritten. The base corpus is sharded once into
``recipes/base-{hash}`` and referenced from every recipe's manifest; its identity (the hash of its source index:
which samples, captions and files) is part of every recipe's spec that includes it, so pointing a data key at
another corpus (``data.cc_shards``, ``data.imagenet_captions_json``) gives new recipe directories, and a corpus that
does not exist is an error even when recipes built on another one exist. (The world's own base corpus is part of
the world, whose directory hash the recipe's source index already carries.) Shards are written by
``recipe.workers`` processes, and each directory gets its sample index (clipgen.data.sampleindex) with its shards,
so the trainer never has to read them to find out what they hold.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipgen import layout, recipedir
from clipgen.data.cache import derived
from clipgen.data.index import Sample, index_hash, sample_ids_hash
from clipgen.data.sampleindex import index_dir, index_key, shard_stats, write_index
from clipgen.data.sources import base_digest, base_index, domainnet_index, domainnet_root
from clipgen.errors import ClipgenError
from clipgen.facts import DEFAULT_JPEG_QUALITY, domainnet_label, recipe_image_format
from clipgen.recipes.captions import make_caption
from clipgen.recipes.naming import RecipeSpec, recipe_spec
from clipgen.recipes.plan import Plan, check_no_leak, format_plan, plan_recipe, train_index
from clipgen.recipes.shards import write_shard_set
from clipgen.world.generate import ensure_world
from clipgen.files import is_disk_error, sweep_stale_dirs, write_error
from clipgen.hashing import stable_hash
from clipgen.provenance import git_sha

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
        if recipedir.is_built(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def recipe_workers(cfg: DictConfig) -> int:
    """recipe.workers: processes writing shards (null: every core this process may run on)."""
    w = cfg.recipe.workers
    if w is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if int(w) < 1:
        raise ClipgenError(f"recipe.workers={w}: expected 1 (in this process) or more processes, or null for "
                           "every core")
    return int(w)


def image_format(cfg: DictConfig) -> str:
    """recipe.image_format with auto resolved by the data source (clipgen.facts.RECIPE_IMAGE_FORMAT)."""
    try:
        return recipe_image_format(str(cfg.recipe.image_format), str(cfg.data.source))
    except ValueError as e:
        raise ClipgenError(str(e)) from None


def _format_spec(cfg: DictConfig) -> dict:
    """The spec fields of how images are stored. The JPEG quality joins only when it is not the default, so that
    the directories of every recipe built before it could be chosen stay the same."""
    out = {"image_px": cfg.recipe.image_px, "image_format": image_format(cfg)}
    if out["image_format"] == "jpg" and int(cfg.recipe.jpeg_quality) != DEFAULT_JPEG_QUALITY:
        out["jpeg_quality"] = int(cfg.recipe.jpeg_quality)
    return out


def _write_dir(final: Path, samples: list[Sample], captions: list[str], cfg: DictConfig,
               manifest: dict) -> dict:
    """Shards + sizes.json + manifest.json + the sample index into a temporary sibling, verified, then renamed
    into place."""
    r = cfg.recipe
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_dirs(final.parent, ".*.tmp-*")  # builds of killed runs (judged by age: shared roots)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        sizes, columns = write_shard_set(tmp, samples, captions, r.image_px, image_format(cfg), r.shard_size,
                                         r.min_shards, workers=recipe_workers(cfg), quality=int(r.jpeg_quality))
        if sum(sizes.values()) != len(samples):
            raise ClipgenError(f"recipe {final.name}: wrote {sum(sizes.values())} samples but planned "
                               f"{len(samples)}; nothing was published")
        manifest = {**manifest, "num_samples": len(samples), "shards": sizes,
                    "sample_ids_hash": sample_ids_hash(s.sample_id for s in samples)}
        recipedir.write(tmp, sizes, manifest)
        key = index_key(shard_stats(tmp, sizes), r.image_px)
        write_index(index_dir(tmp, key), columns, r.image_px, key, "writer")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_error(e):  # a full disk: one line naming the recipe and the space left
            raise write_error(final, e, "recipe") from None
        raise
    _publish(tmp, final)
    return recipedir.read_manifest(final)


def _shuffled(items: list, seed) -> list:
    """Shard order is a seeded permutation so that shard-level readers (open_clip's trainer) see mixed data."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]


def base_spec(cfg: DictConfig) -> dict | None:
    """What determines the base directory's bytes: the identity of the base corpus (the hash of its source index,
    from the index cache's side file when it was read before) and how its images are stored. None for
    data.base=none. A corpus that does not exist is a ClipgenError."""
    digest = base_digest(cfg)
    if digest is None:
        return None
    r = cfg.recipe
    return {"source_index_hash": digest["digest"], **_format_spec(cfg), "shard_size": r.shard_size,
            "min_shards": r.min_shards, "version": RECIPE_FORMAT_VERSION}


def base_dir_name(spec: dict) -> str:
    return f"base-{stable_hash(spec, 10)}"


def ensure_base(cfg: DictConfig, spec: dict | None = None) -> dict | None:
    """Shard the base corpus once; returns its manifest (None when data.base=none)."""
    spec = base_spec(cfg) if spec is None else spec
    if spec is None:
        return None
    final = layout.recipes_root(cfg) / base_dir_name(spec)
    if recipedir.is_built(final):
        return recipedir.read_manifest(final, "base manifest")
    samples = base_index(cfg)
    # The order depends on the sample ids only, not on where the files live.
    samples = _shuffled(samples, "base:" + sample_ids_hash(s.sample_id for s in samples))
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.class_name] = counts.get(s.class_name, 0) + 1
    manifest = {"kind": "base", "spec": spec, "source": cfg.data.base, "source_index_hash": spec["source_index_hash"],
                "counts": {"natural": counts}, "image_px": spec["image_px"], "image_format": spec["image_format"],
                "git_sha": git_sha(), "dir": final.name}
    return _write_dir(final, samples, [s.caption or "" for s in samples], cfg, manifest)


def _recipe_spec_dict(spec: RecipeSpec, cfg: DictConfig, src_hash: str, heldout: list[str],
                      base: dict | None) -> dict:
    r = cfg.recipe
    out = {"recipe_id": spec.recipe_id, "kind": spec.kind, "test_domain": spec.test_domain,
           "domains": list(spec.domains), "heldout_keep": spec.heldout_keep, "size_matched": spec.size_matched,
           "aligned_captions": spec.aligned_captions, "subsample": spec.subsample, "seed": spec.seed,
           "caption_seed": r.caption_seed, "heldout_classes": heldout, **_format_spec(cfg),
           "shard_size": r.shard_size, "min_shards": r.min_shards, "source_index_hash": src_hash,
           "base": cfg.data.base, "version": RECIPE_FORMAT_VERSION}
    if base is not None and not (cfg.data.base == "world" and cfg.data.source == "world"):
        out["base_dir"] = base_dir_name(base)  # the world's base is part of the world, already in src_hash
    return out


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
    bspec = base_spec(cfg)  # before looking for a finished build: another base corpus is another recipe
    spec_dict = _recipe_spec_dict(spec, cfg, src_hash, list(plan.heldout), bspec)
    final = layout.recipes_root(cfg) / f"{spec.recipe_id}-{stable_hash(spec_dict, 10)}"
    summary = {"recipe_id": spec.recipe_id, "recipe_dir": str(final), "num_samples": plan.size,
               "target_size": plan.target_size}
    if cfg.recipe.dry_run:
        print(format_plan(plan))
        print(f"dry run: would write {plan.size} samples to {final}")
        return {**summary, "dry_run": True, "built": False}
    if recipedir.is_built(final):
        return {**summary, "built": False, "seconds": time.time() - t0}
    base = ensure_base(cfg, bspec)
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
        "source_index_hash": src_hash, "image_px": cfg.recipe.image_px, "image_format": image_format(cfg),
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
