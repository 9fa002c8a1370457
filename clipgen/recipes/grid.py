"""A study's grid: the runs a study config names, as (test domain, recipe entry, seed) jobs, each job's own config
(what ``clipgen-train`` would get with overrides) and its run directory. clipgen-study launches them; the diffing
tool's methods comparison finds the same runs through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, open_dict

from clipgen import rundir
from clipgen.config import copy_config
from clipgen.errors import ClipgenError
from clipgen.recipes.naming import RECIPE_KINDS, recipe_spec


@dataclass(frozen=True)
class Job:
    test_domain: str
    recipe: str  # study entry: a recipe kind, or "allow:P" / "interpolation:LETTERS"
    seed: int


def parse_recipe_entry(entry: str, test_domain: str) -> dict:
    """Study recipe entries: a kind (``cg_high``), ``allow:0.2`` or ``allow:0.2:cg_low`` (p and the base
    recipe), ``interpolation:cqrs`` (letters of all included domains, as in the paper's lists); a ``+aligned``
    suffix gives the aligned-caption variant (``cg_high+aligned``)."""
    from clipgen.facts import DOMAIN_LETTERS, NATURAL_DOMAIN

    entry, plus, suffix = str(entry).partition("+")
    if plus and suffix != "aligned":
        raise ClipgenError(f"study.recipes entry {entry}+{suffix!r}: expected the suffix '+aligned' or none")
    kind, _, arg = entry.partition(":")
    if kind not in RECIPE_KINDS:
        raise ClipgenError(f"unknown study.recipes entry {entry!r}: expected one of {', '.join(RECIPE_KINDS)} "
                           "(allow:P and interpolation:LETTERS take an argument)")
    out: dict = {"kind": kind}
    if plus:
        out["aligned_captions"] = True
    if kind == "allow":
        p, _, base = arg.partition(":")
        try:
            out["allow_p"] = float(p)
        except ValueError:
            raise ClipgenError(f"study.recipes entry {entry!r}: expected allow:P[:BASE] with P a number") from None
        if base:
            out["allow_base"] = base
    elif kind == "interpolation":
        by_letter = {v: k for k, v in DOMAIN_LETTERS.items()}
        if not arg or any(ch not in by_letter for ch in arg):
            raise ClipgenError(f"study.recipes entry {entry!r}: expected interpolation:LETTERS, e.g. "
                               "interpolation:cqrs")
        out["extra_domains"] = [by_letter[ch] for ch in arg
                                if by_letter[ch] not in (NATURAL_DOMAIN, test_domain)]
    elif arg:
        raise ClipgenError(f"study.recipes entry {entry!r}: kind {kind!r} takes no argument")
    return out


def job_config(cfg: DictConfig, job: Job) -> DictConfig:
    """The config of one training run of the study (what ``clipgen-train`` would get with overrides)."""
    sub = copy_config(cfg)
    with open_dict(sub):
        for key, value in parse_recipe_entry(job.recipe, job.test_domain).items():
            sub.recipe[key] = value
        sub.recipe.test_domain = job.test_domain
        sub.trainer.seed = job.seed
        if sub.logger.group is None:
            sub.logger.group = cfg.study.name
    recipe_spec(sub.recipe)  # validate before any work starts
    return sub


def study_runs(cfg: DictConfig) -> list[tuple[Job, DictConfig]]:
    """The study's runs with their configs (job_config), one per distinct run directory: natural-only is the same
    run for every test domain, so it appears once (with the first test domain)."""
    from clipgen.recipes.naming import PAPER_INTERPOLATIONS

    grid = []
    for d in cfg.study.test_domains:
        for r in cfg.study.recipes:
            entries = [r]
            if str(r) == "interpolation:paper":  # the paper's list for this test domain (protocol §4)
                if d not in PAPER_INTERPOLATIONS:
                    raise ClipgenError(f"study.recipes entry 'interpolation:paper' has no paper list for test "
                                       f"domain {d!r}: expected one of {', '.join(PAPER_INTERPOLATIONS)}")
                entries = [f"interpolation:{letters}" for letters in PAPER_INTERPOLATIONS[d]]
            grid += [Job(d, e, int(s)) for e in entries for s in cfg.study.seeds]
    if not grid:
        raise ClipgenError("the study has no runs: expected non-empty study.test_domains, study.recipes and "
                           "study.seeds")
    runs, seen = [], set()
    for j in grid:
        sub = job_config(cfg, j)
        name = run_dir_of(sub).name
        if name not in seen:
            seen.add(name)
            runs.append((j, sub))
    return runs


def run_dir_of(sub: DictConfig) -> Path:
    """The run directory of a study job: named by its settings (clipgen.rundir)."""
    return rundir.run_dir(sub, recipe_spec(sub.recipe).recipe_id)
