"""Which samples a recipe contains: domain/class filtering and the exact size-matching rule of protocol §4.

Pure functions over the source index; nothing here touches pixels or disk, so every rule is testable on
hand-made counts and the whole paper family plans in seconds on a DomainNet-sized index.

Size matching. S = |real_train| + |D_train minus C2| (the size of CG-low). X = candidates after filtering, grouped
by (domain, class) in split-file order. With f = S/|X| every list keeps its first ceil(f*n) samples; the
overshoot is trimmed in passes that walk the domains in TRIM_ORDER and, within a domain, its classes in
split-file order, removing the last kept sample of each class and stopping the moment the total reaches S.
allow-p: every held-out list of D keeps ceil(p*f0*n) (f0 = S/|X|, A in total of M); all other lists use
f = (S-A)/(|X|-M), and trimming never touches the held-out lists.

Extra candidates (ImageNet-Sketch, ``EXTRA_SOURCES``) join their (domain, class) lists after the DomainNet samples
but never count towards S, so a recipe has the same size with or without them.

Planning many recipes from one index: group it once with ``train_index(index)`` and pass the result to
``plan_recipe`` instead of the sample list (same plans; the grouping pass is the only O(index) step).
"""
from __future__ import annotations

import math
import random
from fractions import Fraction
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace

from clipgen.data.index import Sample
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS, NATURAL_DOMAIN, TEST_DOMAINS
from clipgen.recipes.naming import ALLOW_P_VALUES, PAPER_INTERPOLATIONS, RecipeSpec, recipe_spec

TRIM_ORDER = ("real", "quickdraw", "painting", "sketch", "infograph", "clipart")
# Sources whose samples are extra candidates of their (domain, class) lists but not part of S.
EXTRA_SOURCES = frozenset({"imagenet_sketch"})

Key = tuple[str, str]  # (domain, class_name)


@dataclass
class Plan:
    spec: RecipeSpec
    target_size: int | None  # S for size-matched recipes, None for natural-only
    groups: "OrderedDict[Key, list[Sample]]"  # kept samples per (domain, class), split-file order
    heldout: tuple[str, ...]  # C2 restricted to the source's classes

    @property
    def samples(self) -> list[Sample]:
        return [s for lst in self.groups.values() for s in lst]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (d, c), lst in self.groups.items():
            out.setdefault(d, {})[c] = len(lst)
        return out


def group_by_domain_class(samples: list[Sample], split: str = "train") -> "OrderedDict[Key, list[Sample]]":
    """(domain, class) -> samples of one split, in split-file order (first appearance orders the classes)."""
    groups: "OrderedDict[Key, list[Sample]]" = OrderedDict()
    for s in samples:
        if s.split == split:
            groups.setdefault((s.domain, s.class_name), []).append(s)
    return groups


@dataclass
class TrainIndex:
    """The train split of a source index grouped once for planning many recipes (see ``train_index``)."""

    groups: "OrderedDict[Key, list[Sample]]"  # (domain, class) -> train samples, split-file order
    core: dict[Key, int]  # samples of each list that count towards S (all but EXTRA_SOURCES)


def train_index(index: "list[Sample] | TrainIndex") -> TrainIndex:
    if isinstance(index, TrainIndex):
        return index
    groups = group_by_domain_class(index, "train")
    core = {k: sum(1 for s in v if s.source not in EXTRA_SOURCES) for k, v in groups.items()}
    return TrainIndex(groups, core)


def target_size(groups: "OrderedDict[Key, list[int] | list[Sample]] | dict[Key, int]", test_domain: str,
                heldout: set[str]) -> int:
    """S = |real_train| + |D_train minus C2| (``groups`` maps keys to lists or to their sizes)."""
    return sum(v if isinstance(v, int) else len(v) for (d, c), v in groups.items()
               if d == NATURAL_DOMAIN or (d == test_domain and c not in heldout))


def quotas(sizes: "OrderedDict[Key, int]", S: int, protected: dict[Key, int] | None = None) -> dict[Key, int]:
    """Per-list quotas of the size rule. ``sizes`` are the candidate lists (X); ``protected`` fixes the quota
    of some lists (allow-p's held-out lists), which are then excluded from the fraction and from trimming."""
    protected = protected or {}
    A = sum(protected.values())
    M = sum(sizes[k] for k in protected)
    rest = sum(sizes.values()) - M
    if rest <= 0 or S - A > rest:
        raise ClipgenError(f"recipe needs {S} samples but has only {rest + A} candidates after filtering: "
                           f"expected the included domains to hold at least S = |real| + |D minus C2|")
    # ceil(f * n) with f = (S - A) / rest, in exact integer arithmetic (no float rounding at the boundary).
    q = {k: (protected[k] if k in protected else min(n, -(-(S - A) * n // rest))) for k, n in sizes.items()}
    over = sum(q.values()) - S
    if over <= 0:
        return q
    by_domain: dict[str, list[Key]] = {}
    for k in sizes:
        if k not in protected:
            by_domain.setdefault(k[0], []).append(k)
    order = [k for d in TRIM_ORDER for k in by_domain.get(d, [])]
    while over > 0:
        removed = False
        for k in order:
            if q[k] > 0:
                q[k] -= 1
                over -= 1
                removed = True
                if over == 0:
                    break
        if not removed:
            raise ClipgenError("size rule could not trim the recipe to S: no list has samples left")
    return q


def _take(lst: list[Sample], k: int, spec: RecipeSpec) -> list[Sample]:
    if k >= len(lst) or spec.subsample == "first":
        return lst[:k]
    # Seeded random variant: a per-list seeded shuffle, then the same "first k" (and trimming) on it.
    d, c = lst[0].domain, lst[0].class_name
    rng = random.Random(f"{spec.seed}:{d}:{c}")
    idx = list(range(len(lst)))
    rng.shuffle(idx)
    return [lst[i] for i in sorted(idx[:k])]


def plan_recipe(spec: RecipeSpec, index: "list[Sample] | TrainIndex", heldout_classes: list[str]) -> Plan:
    """The samples of one recipe from a DomainNet-layout index (train split only; val/test never enter).
    ``index`` is the sample list or its ``train_index`` (the same plan, without regrouping per recipe)."""
    tindex = train_index(index)
    all_groups = tindex.groups
    if not all_groups:
        raise ClipgenError(f"recipe {spec.recipe_id!r} would be empty: the source index has no train samples; "
                           "expected train split lines (validation is carved out of train, never all of it)")
    D = spec.test_domain
    if spec.kind != "natural_only" and not any(d == D for d, _ in all_groups):
        raise ClipgenError(f"test domain {D!r} has no train samples in the source index")
    present = {c for (_, c) in all_groups}
    heldout = tuple(c for c in heldout_classes if c in present)
    if spec.kind != "natural_only" and not heldout:
        raise ClipgenError(f"none of the held-out classes {list(heldout_classes)} occurs in the source: expected "
                           f"at least one held-out class for recipe kind {spec.kind!r}")
    C2 = set(heldout)
    candidates: "OrderedDict[Key, list[Sample]]" = OrderedDict()
    for (d, c), lst in all_groups.items():
        if d not in spec.domains:
            continue
        if d == D and c in C2 and spec.heldout_keep == 0.0:
            continue
        candidates[(d, c)] = lst
    if not candidates:
        raise ClipgenError(f"recipe {spec.recipe_id!r} is empty after filtering: expected samples of "
                           f"{', '.join(spec.domains)}")
    if not spec.size_matched:  # copies: a plan never shares its lists with a reusable TrainIndex
        return Plan(spec, None, OrderedDict((k, list(v)) for k, v in candidates.items()), heldout)

    S = target_size(tindex.core, D, C2)
    if S == 0:
        raise ClipgenError(f"recipe {spec.recipe_id!r} would be empty: S = |real train| + |{D} train minus "
                           f"held-out classes| = 0; expected train samples of real or {D}")
    sizes = OrderedDict((k, len(v)) for k, v in candidates.items())
    protected = None
    if spec.kind == "allow":
        # ceil(p * f0 * n) with f0 = S / |X|, exactly: p is read as the decimal the user wrote.
        p, X = Fraction(str(spec.heldout_keep)), sum(sizes.values())
        protected = {k: min(n, math.ceil(p * S * n / X))
                     for k, n in sizes.items() if k[0] == D and k[1] in C2}
    q = quotas(sizes, S, protected)
    kept = OrderedDict((k, _take(candidates[k], q[k], spec)) for k in candidates if q[k] > 0)
    return Plan(spec, S, kept, heldout)


def paper_family(test_domains=TEST_DOMAINS) -> list[RecipeSpec]:
    """Every recipe of the paper's family (protocol §4) for the given test domains: natural-only (once), CG-low/high,
    LOD, both pseudo upper bounds, allow-p for every p on both bases, the paper's interpolation lists and
    CG-high with aligned captions."""
    specs = [_spec("natural_only", TEST_DOMAINS[-1])]
    for D in test_domains:
        specs += [_spec(kind, D) for kind in ("cg_low", "cg_high", "lod", "cg_low_pseudo", "cg_high_pseudo")]
        specs += [_spec("allow", D, allow_p=p, allow_base=b) for b in ("cg_low", "cg_high") for p in ALLOW_P_VALUES]
        for letters in PAPER_INTERPOLATIONS.get(D, ()):
            extra = [d for d in DOMAINS if d[0] in letters and d not in (NATURAL_DOMAIN, D)]
            specs.append(_spec("interpolation", D, extra_domains=extra))
        specs.append(_spec("cg_high", D, aligned_captions=True))
    return specs


def _spec(kind: str, D: str, **kw) -> RecipeSpec:
    node = dict(kind=kind, test_domain=D, allow_p=0.0, allow_base="cg_high", extra_domains=[],
                aligned_captions=False, subsample="first", seed=0)
    return recipe_spec(SimpleNamespace(**{**node, **kw}))


def check_no_leak(plan: Plan) -> None:
    """Leak guard on the realised samples: no val/test sample, and no held-out class of D unless the recipe
    keeps them on purpose (pseudo upper bounds, allow-p)."""
    D, C2 = plan.spec.test_domain, set(plan.heldout)
    for s in plan.samples:
        if s.split != "train":
            raise ClipgenError(f"leak: {s.split} sample {s.sample_id!r} planned into recipe "
                               f"{plan.spec.recipe_id!r}; only train samples may be used for training")
        if plan.spec.heldout_keep == 0.0 and s.domain == D and s.class_name in C2:
            raise ClipgenError(f"leak: held-out class {s.class_name!r} of test domain {D!r} in recipe "
                               f"{plan.spec.recipe_id!r} (sample {s.sample_id!r})")


def format_plan(plan: Plan) -> str:
    """The plan as a class x domain table of counts (the dry-run output)."""
    counts = plan.counts()
    domains = [d for d in plan.spec.domains if d in counts]
    classes = list(OrderedDict.fromkeys(c for (_, c) in plan.groups))
    width = max([len(c) for c in classes] + [5])
    lines = [f"recipe {plan.spec.recipe_id}: {plan.size} samples"
             + (f" (S = {plan.target_size})" if plan.target_size is not None else " (not size-matched)")
             + f"; held-out classes of {plan.spec.test_domain}: {', '.join(plan.heldout) or '-'}",
             "class".ljust(width) + "".join(f"{d:>11}" for d in domains)]
    for c in classes:
        mark = " *" if c in plan.heldout else ""
        lines.append((c + mark).ljust(width) + "".join(f"{counts[d].get(c, 0):>11}" for d in domains))
    lines.append("total".ljust(width) + "".join(f"{sum(counts[d].values()):>11}" for d in domains))
    return "\n".join(lines)
