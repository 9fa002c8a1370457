"""Planning the paper's 109 recipes from the command line vs in one Python process, on a DomainNet-sized index.

    python benchmarks/plan_cli.py [--scale 1.0]

Writes a DomainNet layout with cleaned DomainNet's per-domain totals x ``--scale`` over its 345 classes (empty
image files: planning only needs their names; see index_cache.py), reads it once so the index cache is warm (as
after a first ``clipgen-recipe``), then plans every recipe of ``clipgen.recipes.plan.paper_family`` two ways:

- CLI: ``clipgen-recipe -m recipe.dry_run=true ...`` Hydra multiruns (basic launcher: one process, jobs in turn),
  one per recipe family (25 CG/LOD/pseudo + 60 allow-p + 2 x 9 interpolation + 5 aligned + natural-only = 109);
  a one-job run gives the process's fixed cost, the rest is per recipe;
- in-process: ``build_recipe`` with ``recipe.dry_run=true`` on each recipe's composed config in one process.

Prints both per-recipe figures and their ratio; the floor is 2 s per CLI recipe after the first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_cache import domainnet_layout  # noqa: E402

FLOOR_S = 2.0
TEST_DOMAINS = "clipart,infograph,painting,quickdraw,sketch"


def sweeps() -> list[list[str]]:
    """The paper family as Hydra sweeps of clipgen-recipe (each list is one multirun)."""
    from clipgen.facts import DOMAINS, NATURAL_DOMAIN
    from clipgen.recipes.naming import ALLOW_P_VALUES, PAPER_INTERPOLATIONS

    out = [["recipe=cg_low,cg_high,lod,cg_low_pseudo,cg_high_pseudo", f"recipe.test_domain={TEST_DOMAINS}"],
           ["recipe=allow", "recipe.allow_base=cg_low,cg_high", f"recipe.test_domain={TEST_DOMAINS}",
            "recipe.allow_p=" + ",".join(f"{p:g}" for p in ALLOW_P_VALUES)],
           ["recipe=cg_high", "recipe.aligned_captions=true", f"recipe.test_domain={TEST_DOMAINS}"]]
    for D, lists in PAPER_INTERPOLATIONS.items():
        extras = ["[" + ",".join(d for d in DOMAINS if d[0] in letters and d not in (NATURAL_DOMAIN, D)) + "]"
                  for letters in lists]
        out.append(["recipe=interpolation", f"recipe.test_domain={D}", "recipe.extra_domains=" + ",".join(extras)])
    return out


def n_jobs(sweep: list[str]) -> int:
    n = 1
    for arg in sweep:
        value = arg.split("=", 1)[1]
        n *= value.count("],[") + 1 if value.startswith("[") else value.count(",") + 1
    return n


def cli(common: list[str], args: list[str], multirun: bool) -> float:
    t = time.perf_counter()
    out = subprocess.run(["clipgen-recipe", *(["-m"] if multirun else []), *common, *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"clipgen-recipe {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of DomainNet's size (default 1.0)")
    args = ap.parse_args()
    from clipgen.config import compose_config
    from clipgen.data.sources import domainnet_index
    from clipgen.recipes.build import build_recipe

    with domainnet_layout(args.scale, "clipgen-plan-cli-") as (_, n, seconds, layout):
        common = [*layout, "data.imagenet_captions_json=null", "data.imagenet_train_root=null", "model=rn50",
                  "recipe.dry_run=true"]
        t = time.perf_counter()
        domainnet_index(compose_config(common))  # the first clipgen-recipe: reads and checks, fills the cache
        first_read = time.perf_counter() - t
        print(f"DomainNet layout with {n:,} images written in {seconds:.1f} s; first read (split files, "
              f"folder listings, existence check) {first_read:.1f} s, cached")

        plan = sweeps()
        total = sum(n_jobs(s) for s in plan) + 1
        fixed = cli(common, ["recipe=natural_only"], multirun=False)  # one process, one recipe
        cli_times = [(s, n_jobs(s), cli(common, s, multirun=True)) for s in plan]
        per_cli = sum(T - fixed for _, _, T in cli_times) / sum(k - 1 for _, k, _ in cli_times)

        # In-process: the same configs, composed and planned one after another in this process.
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            build_recipe(compose_config([*common[:-1], "recipe=natural_only", "recipe.dry_run=true"]))
        first_in = time.perf_counter() - t
        t = time.perf_counter()
        k = 0
        from clipgen.recipes.plan import paper_family

        with contextlib.redirect_stdout(io.StringIO()):
            for spec in paper_family():
                if spec.kind == "natural_only":
                    continue
                over = [f"recipe={spec.kind if not spec.aligned_captions else 'cg_high'}",
                        f"recipe.test_domain={spec.test_domain}", f"recipe.aligned_captions={spec.aligned_captions}"]
                if spec.kind == "allow":
                    base = "cg_low" if len(spec.domains) == 2 else "cg_high"
                    over += [f"recipe.allow_p={spec.heldout_keep:g}", f"recipe.allow_base={base}"]
                if spec.kind == "interpolation":
                    extra = [d for d in spec.domains if d not in ("real", spec.test_domain)]
                    over.append(f"recipe.extra_domains=[{','.join(extra)}]")
                build_recipe(compose_config([*common, *over]))
                k += 1
        per_in = (time.perf_counter() - t) / k

        print(f"\n== {total} paper recipes planned (dry run) on {n:,} images, {os.cpu_count()} cores ==")
        for s, k_jobs, T in cli_times:
            print(f"  clipgen-recipe -m {' '.join(s)[:70]:<70} {k_jobs:>3} recipes {T:6.1f} s")
        print(f"CLI: one process with one recipe           {fixed:6.2f} s (interpreter, Hydra, index from cache)")
        print(f"CLI: per recipe after the first in a sweep {per_cli:6.2f} s   (floor {FLOOR_S:.0f} s)")
        print(f"in-process: first recipe {first_in:6.2f} s, per recipe after it {per_in:6.2f} s")
        print(f"ratio CLI / in-process per recipe: {per_cli / per_in:.2f}")
        print(f"CLI total for {total} recipes: {fixed + sum(T for *_, T in cli_times):.1f} s")
        return 0 if per_cli <= FLOOR_S else 1


if __name__ == "__main__":
    sys.exit(main())
