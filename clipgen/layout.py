"""Where every output lives under ``paths.root``; the names are derived from the config, never from a clock.

    {root}/world/{name}-{hash}/       the synthetic world (DomainNet layout under domainnet/, base under natural/)
    {root}/recipes/base-{hash}/       the base corpus, sharded once and referenced by every recipe
    {root}/recipes/{recipe_id}-{hash}/ one recipe's shards, sizes.json, manifest.json
    {root}/runs/{run_name}/           (named by its settings, clipgen.rundir) config.yaml, meta.json, checkpoints/, latest.pt, eval/
    {root}/runs/{run_name}/analysis/  clipgen-analyze's JSON results, figures and activation caches
    {root}/diffs/{run_a}__vs__{run_b}/ clipgen-diff's summary.md, hypotheses.jsonl, plots
    {root}/report/                    clipgen-report over every run: index.html, summary.csv, figures
    {root}/reports/{study}/           one study's report (its runs only)
    {root}/cache/                     source indexes (clipgen.data.cache), rebuilt when an input changes
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipgen.utils import output_root, stable_hash


def root(cfg: DictConfig) -> Path:
    return output_root(cfg.paths.root)


def world_spec(cfg: DictConfig) -> dict:
    """Everything that determines the world's bytes (the held-out classes are forced into its class list)."""
    spec = OmegaConf.to_container(cfg.world, resolve=True)
    spec.pop("workers", None)  # how many processes render does not change the output
    # Keys added later leave the spec (and so the directory of every existing world) unchanged at their defaults.
    for key, default in (("image_format", "png"), ("base_imagenet_only", False)):
        if spec.get(key) == default:
            spec.pop(key)
    spec["heldout_classes"] = list(cfg.heldout.classes)
    spec["generator_version"] = 1
    return spec


def world_dir(cfg: DictConfig) -> Path:
    return root(cfg) / "world" / f"{cfg.world.name}-{stable_hash(world_spec(cfg), 10)}"


def runs_root(cfg: DictConfig) -> Path:
    return root(cfg) / "runs"


def recipes_root(cfg: DictConfig) -> Path:
    return root(cfg) / "recipes"


def cache_dir(cfg: DictConfig) -> Path:
    return root(cfg) / "cache"


def diffs_root(cfg: DictConfig) -> Path:
    return root(cfg) / "diffs"


def report_dir(cfg: DictConfig) -> Path:
    """clipgen-report's page over every run under paths.root."""
    return root(cfg) / "report"


def study_report_dir(cfg: DictConfig) -> Path:
    """A study's own report (its runs only)."""
    return root(cfg) / "reports" / str(cfg.study.name)


def run_name(cfg: DictConfig, recipe_id: str) -> str:
    """The run directory name (clipgen.rundir: runs are named by their settings)."""
    from clipgen import rundir

    return rundir.run_name(cfg, recipe_id)
