"""Recipe kinds, their domain sets and the paper's recipe ids (protocol §4). The one place recipe naming lives."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from clipgen.errors import ClipgenError
from clipgen.facts import DOMAIN_LETTERS, DOMAINS, NATURAL_DOMAIN, TEST_DOMAINS

RECIPE_KINDS = ("natural_only", "cg_low", "cg_high", "lod", "cg_low_pseudo", "cg_high_pseudo", "allow",
                "interpolation")
# The grid's six recipes in Fig. 2's bar order (protocol §6): every figure and table of them uses this order.
FIG2_KINDS = RECIPE_KINDS[:6]
# How reports name each kind, in the report's order (Fig. 2's bars first); the one place these names live.
KIND_NAMES = {"natural_only": "natural only", "cg_low": "CG low", "cg_high": "CG high", "lod": "LOD (DG)",
              "cg_low_pseudo": "CG low pseudo", "cg_high_pseudo": "CG high pseudo", "allow": "allow-p",
              "interpolation": "interpolation"}
ALLOW_P_VALUES = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
# Paper interpolation lists (letters of included domains), per test domain.
PAPER_INTERPOLATIONS = {
    "sketch": ("qrs", "prs", "irs", "crs", "cqrs", "cprs", "cirs", "cpqrs", "ciprs"),
    "clipart": ("crs", "cqr", "cpr", "cir", "cqrs", "cirs", "cprs", "cpqrs", "ciprs"),
}


@dataclass(frozen=True)
class RecipeSpec:
    """What a recipe contains: DomainNet domains, the test domain, which share of its held-out classes is kept,
    whether it is size-matched, and how captions and subsampling are done."""

    kind: str
    test_domain: str
    domains: tuple[str, ...]  # included DomainNet domains, in DOMAINS order
    heldout_keep: float  # share of each held-out class of D kept: 0 (CG), 1 (pseudo), p (allow)
    size_matched: bool
    aligned_captions: bool = False
    subsample: str = "first"
    seed: int = 0

    @property
    def recipe_id(self) -> str:
        if self.kind == "natural_only":
            rid = "lso-real-only"
        else:
            letters = "".join(DOMAIN_LETTERS[d] for d in self.domains)
            rid = f"lso-{letters}-no{self.test_domain}classes"
            if self.kind.endswith("_pseudo"):
                rid += "-pseudo"
            elif self.kind == "allow":
                rid += f"-allow{self.heldout_keep:g}"
        if self.aligned_captions:
            rid += "-aligned"
        if self.subsample == "random":
            rid += f"-rand{self.seed}"
        return rid


def _ordered(domains) -> tuple[str, ...]:
    return tuple(d for d in DOMAINS if d in set(domains))


def recipe_spec(recipe) -> RecipeSpec:
    """Turn the ``recipe`` config node into a RecipeSpec, checking every value it depends on."""
    if isinstance(recipe, DictConfig):  # a composed config (not a report's partial one): seeds, shard sizes
        from clipgen.preflight import check_values

        check_values({"recipe": recipe}, ("recipe",))
    kind = recipe.kind
    if kind not in RECIPE_KINDS:
        raise ClipgenError(f"unknown recipe.kind {kind!r}: expected one of {', '.join(RECIPE_KINDS)}")
    d = recipe.test_domain
    if d not in TEST_DOMAINS:
        raise ClipgenError(f"invalid recipe.test_domain {d!r}: expected one of {', '.join(TEST_DOMAINS)}")
    if recipe.subsample not in ("first", "random"):
        raise ClipgenError(f"invalid recipe.subsample {recipe.subsample!r}: expected 'first' or 'random'")
    common = dict(kind=kind, test_domain=d, aligned_captions=bool(recipe.aligned_captions),
                  subsample=recipe.subsample, seed=int(recipe.seed) if recipe.subsample == "random" else 0)
    if kind == "natural_only":
        return RecipeSpec(domains=(NATURAL_DOMAIN,), heldout_keep=0.0, size_matched=False, **common)
    if kind in ("cg_low", "cg_low_pseudo"):
        domains = _ordered([NATURAL_DOMAIN, d])
    elif kind in ("cg_high", "cg_high_pseudo"):
        domains = DOMAINS
    elif kind == "lod":
        domains = tuple(x for x in DOMAINS if x != d)
    elif kind == "allow":
        if recipe.allow_base not in ("cg_low", "cg_high"):
            raise ClipgenError(f"invalid recipe.allow_base {recipe.allow_base!r}: expected cg_low or cg_high")
        if not 0.0 < float(recipe.allow_p) < 1.0:
            raise ClipgenError(f"invalid recipe.allow_p {recipe.allow_p!r}: expected 0 < p < 1 "
                               f"(paper: {', '.join(map(str, ALLOW_P_VALUES))})")
        domains = DOMAINS if recipe.allow_base == "cg_high" else _ordered([NATURAL_DOMAIN, d])
        return RecipeSpec(domains=domains, heldout_keep=float(recipe.allow_p), size_matched=True, **common)
    else:  # interpolation
        extra = list(recipe.extra_domains)
        bad = [x for x in extra if x not in DOMAINS or x in (NATURAL_DOMAIN, d)]
        if bad or not 1 <= len(extra) <= 4:
            raise ClipgenError(f"invalid recipe.extra_domains {extra!r}: expected 1 to 4 domains other than "
                               f"real and the test domain {d!r}, from {', '.join(DOMAINS)}")
        domains = _ordered([NATURAL_DOMAIN, d, *extra])
    keep = 1.0 if kind.endswith("_pseudo") else 0.0
    return RecipeSpec(domains=domains, heldout_keep=keep, size_matched=True, **common)
