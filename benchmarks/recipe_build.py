"""Recipe build cost: clipgen's shards (base corpus sharded once, referenced) against a full copy per recipe.

    python benchmarks/recipe_build.py [--root DIR] [--test-domain sketch] [extra Hydra overrides ...]

On the default synthetic world (``world=default``, generated first and not timed with the builds) this builds the
quick start's four recipes (natural-only, CG-low, CG-high, LOD) with ``clipgen.recipes.build.build_recipe`` and
measures wall time and disk use of ``recipes/`` (shards of each recipe + one shared ``base-*`` directory). The
other side does what the original code did: per recipe, a TSV of (file path, caption) and a copy of every image
of the recipe *including the whole base corpus*. Disk is reported as apparent bytes and as allocated blocks
(what ``du`` shows; small files round up to the file-system block).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

RECIPES = ("natural_only", "cg_low", "cg_high", "lod")


def disk_use(path: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes) under ``path``."""
    n = apparent = allocated = 0
    for d, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(d, f))
            n, apparent, allocated = n + 1, apparent + st.st_size, allocated + st.st_blocks * 512
    return n, apparent, allocated


def full_copy(cfg, out: Path) -> tuple[str, int]:
    """One recipe the original way: every image (recipe + base corpus) copied, and a TSV listing them."""
    from clipgen.data.sources import base_index
    from clipgen.recipes.build import plan_from_config
    from clipgen.recipes.captions import make_caption

    plan, _ = plan_from_config(cfg)
    spec = plan.spec
    rows = [(s, make_caption(cfg.recipe.caption_seed, s.sample_id, s.domain, s.class_name, spec.aligned_captions))
            for s in plan.samples]
    rows += [(s, s.caption or "") for s in base_index(cfg)]
    rdir = out / spec.recipe_id
    made: set[Path] = set()
    with open(out / f"{spec.recipe_id}.tsv", "w", encoding="utf-8") as tsv:
        tsv.write("filepath\ttitle\n")
        for s, caption in rows:
            dst = rdir / (s.sample_id + os.path.splitext(s.path)[1])
            if dst.parent not in made:
                dst.parent.mkdir(parents=True, exist_ok=True)
                made.add(dst.parent)
            shutil.copyfile(s.path, dst)
            tsv.write(f"{dst}\t{caption}\n")
    return spec.recipe_id, len(rows)


def shard_payload(path: Path) -> tuple[int, int]:
    """(samples, image bytes) inside the tars under ``path``."""
    n = img = 0
    for tar in path.rglob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith((".png", ".jpg")):
                    n, img = n + 1, img + m.size
    return n, img


def mb(x: int) -> str:
    return f"{x / 2**20:8.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="paths.root (default: a fresh temporary directory, removed after)")
    ap.add_argument("--test-domain", default="sketch")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. world=tiny")
    args = ap.parse_args()

    from clipgen.config import compose_config
    from clipgen.recipes.build import build_recipe
    from clipgen.world.generate import generate_world

    root = Path(args.root or tempfile.mkdtemp(prefix="clipgen-recipe-build-"))

    def cfg_for(kind: str):
        return compose_config([f"paths.root={root}", "world=default", "logger=none", f"recipe={kind}",
                               f"recipe.test_domain={args.test_domain}", *args.overrides])

    try:
        t0 = time.perf_counter()
        generate_world(cfg_for(RECIPES[0]))
        t_world = time.perf_counter() - t0

        os.sync()  # the world's writes are not charged to either side; each side's timing ends with a sync
        ours = []
        for kind in RECIPES:
            t = time.perf_counter()
            out = build_recipe(cfg_for(kind))
            os.sync()
            ours.append((out["recipe_id"], time.perf_counter() - t, out["num_samples"], Path(out["recipe_dir"])))
        t_ours = sum(x[1] for x in ours)
        files_o, app_o, alloc_o = disk_use(root / "recipes")
        base_dirs = [p for p in (root / "recipes").iterdir() if p.name.startswith("base-")]

        copy_root = root / "fullcopy"
        copy_root.mkdir(exist_ok=True)
        theirs = []
        for kind in RECIPES:
            t = time.perf_counter()
            rid, n = full_copy(cfg_for(kind), copy_root)
            os.sync()
            theirs.append((rid, time.perf_counter() - t, n))
        t_theirs = sum(x[1] for x in theirs)
        files_c, app_c, alloc_c = disk_use(copy_root)

        print(f"world=default generated in {t_world:.1f} s (not counted); test domain {args.test_domain}; "
              f"paths.root {root}")
        print("clipgen recipes (shards; base corpus sharded once, referenced by every manifest):")
        for rid, sec, n, rdir in ours:
            print(f"  {rid:<32} {n:>7} samples  {sec:6.1f} s  {mb(disk_use(rdir)[1])}")
        for b in base_dirs:
            print(f"  {b.name:<32} {sum(1 for _ in b.glob('*.tar'))} shards, once  {mb(disk_use(b)[1])}  "
                  "(built with the first recipe)")
        print(f"  total {t_ours:6.1f} s, {files_o} files, apparent {mb(app_o)}, allocated {mb(alloc_o)}")
        print("full copy per recipe (TSV + a copy of every image, base corpus included in each):")
        for rid, sec, n in theirs:
            size = disk_use(copy_root / rid)[1] + (copy_root / f"{rid}.tsv").stat().st_size
            print(f"  {rid:<32} {n:>7} images   {sec:6.1f} s  {mb(size)}")
        print(f"  total {t_theirs:6.1f} s, {files_c} files, apparent {mb(app_c)}, allocated {mb(alloc_c)}")
        n_imgs, img_bytes = shard_payload(root / "recipes")
        print(f"images stored: clipgen {n_imgs}, full copy {files_c - len(theirs)} "
              f"({(files_c - len(theirs)) / n_imgs:.2f}x); clipgen's image bytes {mb(img_bytes)}, tar headers and "
              f"padding {(app_o - img_bytes) / n_imgs:.0f} B per sample (3 members of >= 512 B + 512 B header each)")
        print(f"ratio full copy / clipgen: time {t_theirs / t_ours:.2f}x, apparent disk {app_c / app_o:.2f}x, "
              f"allocated disk {alloc_c / alloc_o:.2f}x, files {files_c / files_o:.0f}x")
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
