"""Source-index cache: reading a DomainNet-sized folder from its split files against the cached index.

    python benchmarks/index_cache.py [--scale 1.0] [--repeats 3]

Writes a DomainNet layout with cleaned DomainNet's per-domain train/test totals (protocol §2.2) x ``--scale`` over its
345 classes (empty image files: only names matter to the index) into a temporary directory, then times, side by
side, ``domainnet_index`` with ``data.index_cache=false`` (parse 12 split files, list every class folder, check
every listed file, carve the validation split) and with the cache warm (one gzip JSON read). Prints both times,
the ratio and the cache file's size.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_root  # noqa: E402
from plan_scale import DOMAINNET_TOTALS, split_total  # noqa: E402


def write_layout(root: Path, scale: float) -> int:
    from clipgen.facts import class_folder, domainnet_classes

    classes = domainnet_classes()
    n = 0
    for d, (train, test) in DOMAINNET_TOTALS.items():
        weights = [1.0 + (i * 7919 % 13) / 6 for i in range(len(classes))]  # uneven, deterministic
        for split, total in (("train", train), ("test", test)):
            lines = []
            for label, (c, k) in enumerate(zip(classes, split_total(max(len(classes), int(total * scale)), weights))):
                folder = root / d / class_folder(c)
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(k):
                    name = f"{split}_{i:06d}.jpg"
                    open(folder / name, "wb").close()
                    lines.append(f"{d}/{class_folder(c)}/{name} {label}\n")
            (root / f"{d}_{split}.txt").write_text("".join(lines))
            n += len(lines)
    return n


@contextlib.contextmanager
def domainnet_layout(scale: float, prefix: str) -> Iterator[tuple[Path, int, float, list[str]]]:
    """A temporary DomainNet layout at ``scale`` (removed afterwards): ``(directory, images, seconds to write,
    the overrides that read it as data=domainnet with no base corpus and outputs under <directory>/out)``."""
    with bench_root(None, prefix) as tmp:
        t0 = time.time()
        n = write_layout(tmp / "dn", scale)
        yield tmp, n, time.time() - t0, ["data=domainnet", f"data.domainnet_root={tmp / 'dn'}", "data.base=none",
                                         f"paths.root={tmp / 'out'}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of DomainNet's size (default 1.0)")
    ap.add_argument("--repeats", type=int, default=3, help="timed reads of each kind; the best counts")
    args = ap.parse_args()
    from clipgen.config import compose_config
    from clipgen.data.sources import domainnet_index

    with domainnet_layout(args.scale, "clipgen-index-bench-") as (tmp, n, seconds, over):
        print(f"DomainNet layout with {n} images written in {seconds:.1f} s")
        cold_cfg = compose_config([*over, "data.index_cache=false"])
        warm_cfg = compose_config(over)
        domainnet_index(warm_cfg)  # fills the cache
        cold, warm = [], []
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            a = domainnet_index(cold_cfg)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = domainnet_index(warm_cfg)
            warm.append(time.perf_counter() - t)
            assert a == b, "the cached index differs from the source"
        size = sum(f.stat().st_size for f in (tmp / "out" / "cache").iterdir())
        print(f"\n== source index of {n} DomainNet-layout images, {os.cpu_count()} cores, best of {len(cold)} ==")
        print(f"read from split files + folders  {min(cold):7.2f} s")
        print(f"read from the cache              {min(warm):7.2f} s   (cache file {size / 1e6:.1f} MB)")
        print(f"ratio {min(cold) / min(warm):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
