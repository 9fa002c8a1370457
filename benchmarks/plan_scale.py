"""Scale check of the recipe planner on a DomainNet-sized index (no pixels, nothing written).

    python benchmarks/plan_scale.py [--base 425000] [--seed 0] [--val-fraction 0.05]

Builds in memory an index with DomainNet's cleaned train/test totals per domain (protocol §2.2) over its 345 classes,
with uneven per-class counts, plus a base corpus of 425k ImageNet-Captions-style entries; then plans every recipe
of the paper family (``clipgen.recipes.plan.paper_family``) for the five test domains with ``plan_recipe`` and
runs ``check_no_leak`` on each. Prints the time of each phase, the number of recipes and samples, and the peak
RSS. The floor is 60 s and 2 GB for index + planning.
"""
from __future__ import annotations

import argparse
import random
import resource
import sys
import time

# protocol §2.2: cleaned DomainNet totals (train, test).
DOMAINNET_TOTALS = {
    "clipart": (33_525, 14_604), "infograph": (36_023, 15_582), "painting": (50_416, 21_850),
    "quickdraw": (120_750, 51_750), "real": (120_906, 52_041), "sketch": (48_212, 20_916),
}
BUDGET_S, BUDGET_MB = 60.0, 2048.0


def split_total(total: int, weights: list[float]) -> list[int]:
    """``total`` split over classes proportionally to ``weights`` (largest remainder), at least 1 each."""
    n = len(weights)
    rest = total - n
    w = sum(weights)
    raw = [rest * x / w for x in weights]
    out = [1 + int(r) for r in raw]
    left = total - sum(out)
    for i in sorted(range(n), key=lambda i: raw[i] - int(raw[i]), reverse=True)[:left]:
        out[i] += 1
    return out


def synthetic_domainnet(totals=DOMAINNET_TOTALS, classes=None, seed: int = 0):
    """A DomainNet-layout index without pixels: per domain, uneven per-class counts that sum to the totals."""
    from clipgen.data.index import Sample
    from clipgen.facts import DOMAINS, class_folder, domainnet_classes

    classes = list(classes or domainnet_classes())
    labels = {c: i for i, c in enumerate(domainnet_classes())}
    rng = random.Random(seed)
    samples = []
    for d in DOMAINS:
        n_train, n_test = totals[d]
        weights = [rng.lognormvariate(0.0, 0.6) for _ in classes]  # uneven like DomainNet (x10 spread)
        for split, counts in (("train", split_total(n_train, weights)), ("test", split_total(n_test, weights))):
            for c, n in zip(classes, counts):
                folder = class_folder(c)
                for i in range(n):
                    sid = f"{d}/{folder}/{d}_{labels[c]:03d}_{split[:2]}{i:06d}"
                    samples.append(Sample(sid, f"/data/domainnet/{sid}.jpg", d, c, labels[c], split, "domainnet"))
    return samples


def synthetic_base(n: int, seed: int = 0):
    """n ImageNet-Captions-style base entries (1000 wnids, label -1 where no DomainNet class maps)."""
    from clipgen.data.imagenet_captions import wnid_table
    from clipgen.data.index import Sample

    table = sorted(wnid_table().items())[:1000]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        wnid, (name, label) = table[i % len(table)]
        out.append(Sample(f"base/{wnid}/{wnid}_{i}", f"/data/imagenet/train/{wnid}/{wnid}_{i}.JPEG", "natural",
                          name, label, "train", "imagenet_captions",
                          f"{name} photo {rng.randrange(10**6)}; tag{i % 97} tag{i % 89}; a photo of a {name}"))
    return out


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=425_000, help="base corpus entries (paper: ~425k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.05, help="validation carved out of train")
    args = ap.parse_args()

    from clipgen.data.domainnet import carve_validation, check_all_classes, check_duplicates
    from clipgen.facts import DOMAINS
    from clipgen.data.index import index_hash, sample_ids_hash
    from clipgen.recipes.plan import check_no_leak, paper_family, plan_recipe, train_index
    import yaml
    from importlib import resources

    with resources.files("clipgen.conf").joinpath("heldout/paper.yaml").open() as f:
        heldout = list(yaml.safe_load(f)["classes"])

    t0 = time.perf_counter()
    index = synthetic_domainnet(seed=args.seed)
    check_duplicates(index)  # the reader's checks on real DomainNet
    check_all_classes(index, DOMAINS)
    index = carve_validation(index, args.val_fraction, 0)
    base = synthetic_base(args.base, args.seed)
    t_index = time.perf_counter() - t0

    t1 = time.perf_counter()
    hashes = (index_hash(index), index_hash(base))
    t_hash = time.perf_counter() - t1

    t2 = time.perf_counter()
    tindex = train_index(index)
    specs = paper_family()
    rows, total = [], 0
    for spec in specs:
        plan = plan_recipe(spec, tindex, heldout)
        check_no_leak(plan)
        ids = [s.sample_id for s in plan.samples]
        if plan.target_size is not None and plan.size != plan.target_size:
            raise SystemExit(f"{spec.recipe_id}: {plan.size} samples, expected S = {plan.target_size}")
        if len(set(ids)) != len(ids):
            raise SystemExit(f"{spec.recipe_id}: duplicate sample ids")
        rows.append((spec.recipe_id, spec.test_domain, plan.size, sample_ids_hash(ids)[:8]))
        total += plan.size
    t_plan = time.perf_counter() - t2
    recipe_ids = [r[0] for r in rows]
    if len(set(recipe_ids)) != len(recipe_ids):
        raise SystemExit("duplicate recipe ids in the paper family")

    rss = peak_rss_mb()
    n_train = sum(1 for s in index if s.split == "train")
    print(f"index: {len(index):,} DomainNet samples ({n_train:,} train) over 345 classes + {len(base):,} base "
          f"entries, built in {t_index:.1f} s; index hashes in {t_hash:.1f} s ({hashes[0][:8]}, {hashes[1][:8]})")
    print(f"planned {len(specs)} recipes of the paper family ({total:,} samples in all) with plan_recipe + "
          f"check_no_leak in {t_plan:.1f} s ({1000 * t_plan / len(specs):.0f} ms per recipe)")
    for D in sorted({r[1] for r in rows}):
        sizes = sorted({r[2] for r in rows if r[1] == D and not r[0].startswith("lso-real-only")})
        print(f"  {D:<10} S = {', '.join(f'{s:,}' for s in sizes)}  "
              f"({sum(1 for r in rows if r[1] == D and r[0] != 'lso-real-only')} recipes)")
    wall = t_index + t_hash + t_plan
    ok = wall <= BUDGET_S and rss <= BUDGET_MB
    print(f"total {wall:.1f} s (floor {BUDGET_S:.0f} s), peak RSS {rss:.0f} MB (floor {BUDGET_MB:.0f} MB) -> "
          f"{'within' if ok else 'OVER'} the floor")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
