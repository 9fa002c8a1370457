"""The size-matching rule of protocol §4 on hand-computed cases and as a property over random counts."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipgen.data.index import Sample
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS
from clipgen.recipes.captions import make_caption
from clipgen.recipes.naming import recipe_spec
from clipgen.recipes.plan import TRIM_ORDER, check_no_leak, plan_recipe, quotas
from omegaconf import OmegaConf


def make_index(counts: dict[str, dict[str, int]], test_per=1) -> list[Sample]:
    out = []
    for d, per_class in counts.items():
        for c, n in per_class.items():
            for i in range(n):
                out.append(Sample(f"{d}/{c}/{i}", f"/x/{d}/{c}/{i}.png", d, c, 0, "train", "domainnet"))
            for i in range(test_per):
                out.append(Sample(f"{d}/{c}/t{i}", f"/x/{d}/{c}/t{i}.png", d, c, 0, "test", "domainnet"))
    return out


def spec(kind, D="sketch", **kw):
    base = dict(kind=kind, test_domain=D, allow_p=0.1, allow_base="cg_high", extra_domains=[],
                aligned_captions=False, subsample="first", seed=0)
    base.update(kw)
    return recipe_spec(OmegaConf.create(base))


def test_recipe_ids():
    assert spec("natural_only").recipe_id == "lso-real-only"
    assert spec("cg_low").recipe_id == "lso-rs-nosketchclasses"
    assert spec("cg_high").recipe_id == "lso-cipqrs-nosketchclasses"
    assert spec("lod").recipe_id == "lso-cipqr-nosketchclasses"
    assert spec("cg_high_pseudo").recipe_id == "lso-cipqrs-nosketchclasses-pseudo"
    assert spec("allow", allow_p=0.2, allow_base="cg_low").recipe_id == "lso-rs-nosketchclasses-allow0.2"
    assert spec("cg_high", aligned_captions=True).recipe_id == "lso-cipqrs-nosketchclasses-aligned"
    assert spec("interpolation", D="clipart", extra_domains=["quickdraw"]).recipe_id == \
        "lso-cqr-noclipartclasses"
    assert spec("cg_low", subsample="random", seed=3).recipe_id == "lso-rs-nosketchclasses-rand3"
    with pytest.raises(ClipgenError, match="test_domain 'real'"):
        spec("cg_low", D="real")
    with pytest.raises(ClipgenError, match="extra_domains"):
        spec("interpolation", extra_domains=["sketch"])


def test_hand_computed_cg_high():
    # real: a=10 b=10; sketch: a=6 b=4 (b held out); clipart: a=5 b=5.  S = 20 + 6 = 26.
    idx = make_index({"real": {"a": 10, "b": 10}, "sketch": {"a": 6, "b": 4}, "clipart": {"a": 5, "b": 5}})
    plan = plan_recipe(spec("cg_high"), idx, ["b"])
    # X = 20 + 6 + 10 = 36, f = 26/36: ceil(f*10) = 8, ceil(f*6) = 5, ceil(f*5) = 4 -> 8+8+5+4+4 = 29.
    # Overshoot 3, trimmed in order real(a, b), quickdraw, painting, sketch(a) -> real a 7, real b 7, sketch a 4.
    assert plan.target_size == 26 and plan.size == 26
    assert plan.counts() == {"real": {"a": 7, "b": 7}, "sketch": {"a": 4}, "clipart": {"a": 4, "b": 4}}
    # "first n in split-file order"
    assert [s.sample_id for s in plan.groups[("real", "a")]] == [f"real/a/{i}" for i in range(7)]


def test_cg_low_is_exactly_S_and_lod_excludes_D():
    idx = make_index({"real": {"a": 10, "b": 10}, "sketch": {"a": 6, "b": 4}, "clipart": {"a": 50, "b": 50}})
    low = plan_recipe(spec("cg_low"), idx, ["b"])
    assert low.counts() == {"real": {"a": 10, "b": 10}, "sketch": {"a": 6}}
    lod = plan_recipe(spec("lod"), idx, ["b"])
    assert lod.size == 26 and "sketch" not in lod.counts()
    nat = plan_recipe(spec("natural_only"), idx, ["b"])
    assert nat.target_size is None and nat.counts() == {"real": {"a": 10, "b": 10}}


def test_allow_p_quotas_and_trimming_never_touches_heldout():
    idx = make_index({"real": {"a": 10, "b": 10}, "sketch": {"a": 6, "b": 8}, "clipart": {"a": 5, "b": 5}})
    plan = plan_recipe(spec("allow", allow_p=0.5), idx, ["b"])
    S, X = 26, 44
    A = math.ceil(0.5 * S / X * 8)  # = 3
    assert plan.counts()["sketch"]["b"] == A
    assert plan.size == S
    check_no_leak(plan)  # allow keeps held-out samples on purpose


def test_pseudo_keeps_heldout_and_leak_guard_refuses_planted_leak():
    idx = make_index({"real": {"a": 10, "b": 10}, "sketch": {"a": 6, "b": 4}})
    pseudo = plan_recipe(spec("cg_low_pseudo"), idx, ["b"])
    assert pseudo.counts()["sketch"].get("b", 0) > 0 and pseudo.size == 26
    plan = plan_recipe(spec("cg_low"), idx, ["b"])
    bad = Sample("sketch/b/x", "/x", "sketch", "b", 0, "train", "domainnet")
    plan.groups[("sketch", "b")] = [bad]
    with pytest.raises(ClipgenError, match="leak: held-out class 'b'"):
        check_no_leak(plan)
    plan.groups.pop(("sketch", "b"))
    plan.groups[("real", "a")].append(Sample("real/a/t0", "/x", "real", "a", 0, "test", "domainnet"))
    with pytest.raises(ClipgenError, match="leak: test sample"):
        check_no_leak(plan)


def test_unknown_heldout_and_empty_recipe_errors():
    idx = make_index({"real": {"a": 3}, "sketch": {"a": 3}})
    with pytest.raises(ClipgenError, match="none of the held-out classes"):
        plan_recipe(spec("cg_low"), idx, ["zebra"])


def test_random_variant_is_seeded_and_same_size():
    idx = make_index({"real": {"a": 30, "b": 30}, "sketch": {"a": 20, "b": 10}, "quickdraw": {"a": 40, "b": 40}})
    r1 = plan_recipe(spec("cg_high", subsample="random", seed=1), idx, ["b"])
    r1b = plan_recipe(spec("cg_high", subsample="random", seed=1), idx, ["b"])
    r2 = plan_recipe(spec("cg_high", subsample="random", seed=2), idx, ["b"])
    first = plan_recipe(spec("cg_high"), idx, ["b"])
    assert r1.counts() == first.counts() == r2.counts()
    assert [s.sample_id for s in r1.samples] == [s.sample_id for s in r1b.samples]
    assert [s.sample_id for s in r1.samples] != [s.sample_id for s in r2.samples]


def test_captions_seeded_and_aligned_has_no_domain_word():
    from clipgen.facts import DOMAIN_TERMS

    c1 = make_caption(42, "sketch/axe/1", "sketch", "axe")
    assert c1 == make_caption(42, "sketch/axe/1", "sketch", "axe")
    seen = {make_caption(42, f"sketch/axe/{i}", "sketch", "axe") for i in range(300)}
    assert any("sketch" in c or "drawing" in c for c in seen) and len(seen) > 20
    assert all("axe" in c for c in seen)
    words = {w for pair in DOMAIN_TERMS.values() for w in pair}
    for d in DOMAINS:
        for i in range(200):
            c = make_caption(42, f"{d}/x/{i}", d, "axe", aligned=True)
            assert not any(w in c for w in words), c
            assert "image" in c or "picture" in c


counts_strategy = st.dictionaries(
    st.sampled_from(DOMAINS), st.lists(st.integers(0, 40), min_size=3, max_size=3), min_size=6, max_size=6)


@settings(max_examples=150, deadline=None)
@given(counts=counts_strategy, D=st.sampled_from(["clipart", "infograph", "painting", "quickdraw", "sketch"]),
       kind=st.sampled_from(["cg_low", "cg_high", "lod", "cg_high_pseudo", "allow"]), p=st.sampled_from([0.1, 0.6]))
def test_size_rule_property(counts, D, kind, p):
    classes = ["a", "b", "h"]  # h is held out
    table = {d: {c: n for c, n in zip(classes, ns) if n > 0} for d, ns in counts.items()}
    table = {d: v for d, v in table.items() if v}
    if D not in table or "real" not in table or not any("h" in v for v in table.values()):
        return
    idx = make_index(table, test_per=0)
    sp = spec(kind, D=D, allow_p=p)
    S = sum(table["real"].values()) + sum(n for c, n in table[D].items() if c != "h")
    X = {(d, c): n for d, v in table.items() if d in sp.domains for c, n in v.items()
         if not (d == D and c == "h" and kind in ("cg_low", "cg_high", "lod"))}
    if S == 0:
        return
    protected_n = sum(n for (d, c), n in X.items() if d == D and c == "h") if kind == "allow" else 0
    try:
        plan = plan_recipe(sp, idx, ["h"])
    except ClipgenError as e:
        assert "candidates" in str(e)  # fewer candidates than S is refused, never silently undersized
        return
    counts_out = plan.counts()
    assert plan.size == S
    if kind in ("cg_low", "cg_high", "lod"):
        assert counts_out.get(D, {}).get("h", 0) == 0
    check_no_leak(plan)
    total = sum(X.values())
    A = counts_out.get(D, {}).get("h", 0) if kind == "allow" else 0
    if kind == "allow" and ("h" in table[D]):
        n = table[D]["h"]
        assert A == min(n, math.ceil(p * S * n / total - 1e-12))  # allow quota, never trimmed
    # every other list: first ceil(f*n) with f = (S-A)/(|X|-M), then trimmed one sample per pass in TRIM_ORDER
    order = [k for d in TRIM_ORDER for k in X if k[0] == d and not (kind == "allow" and k == (D, "h"))]
    rest = total - protected_n
    cuts = []
    for key in order:
        n = X[key]
        quota = min(n, -(-(S - A) * n // rest))
        k = counts_out.get(key[0], {}).get(key[1], 0)
        assert 0 <= quota - k
        if k > 0:
            cuts.append(quota - k)
    assert cuts == sorted(cuts, reverse=True) and (not cuts or cuts[0] - cuts[-1] <= 1)


def test_quotas_trim_order_exact():
    sizes = OrderedDict([(("clipart", "a"), 10), (("real", "a"), 10), (("real", "b"), 10), (("quickdraw", "a"), 10)])
    q = quotas(sizes, 33)  # f = 33/40 -> ceil(8.25) = 9 each = 36, overshoot 3
    assert q == {("clipart", "a"): 9, ("real", "a"): 8, ("real", "b"): 8, ("quickdraw", "a"): 8}
    q = quotas(sizes, 31)  # 36 -> overshoot 5: pass1 real a, real b, quickdraw, clipart; pass2 real a
    assert q == {("clipart", "a"): 8, ("real", "a"): 7, ("real", "b"): 8, ("quickdraw", "a"): 8}
