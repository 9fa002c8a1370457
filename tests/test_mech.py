"""The study of the paper's third finding (clipgen.analyze: floors, chance levels, whole-circuit similarity, rank
statistics, the report's measures): each baseline and statistic on inputs whose answer is known by construction."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from clipgen.analyze import circuits as C
from clipgen.analyze import cka as K
from clipgen.analyze import rankstats as R
from clipgen.analyze import sharing as S
from clipgen.facts import DOMAINS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- SAE loss scale ------------------------------------------------------------------------------------------
def test_sae_reconstruction_error_is_averaged_over_dimensions():
    """The authors' library averages the squared error over the embedding's dimensions: repeating every
    dimension 4 times (a 4x wider embedding with the same information) leaves the loss unchanged, so the same L1
    weight means the same sparsity pressure at 64 and at 1024 dimensions."""
    from clipgen.analyze.sae import sae_loss

    g = torch.Generator().manual_seed(0)
    x, x_hat, f = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.rand(8, 32, generator=g)
    loss, parts = sae_loss(x, x_hat, f, l1=0.01)
    assert parts["reconstruction"] == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-6)
    assert float(loss) == pytest.approx(parts["reconstruction"] + 0.01 * float(f.sum(dim=1).mean()), rel=1e-6)
    wide, _ = sae_loss(x.repeat(1, 4), x_hat.repeat(1, 4), f, l1=0.01)
    assert float(wide) == pytest.approx(float(loss), rel=1e-6)


# --- floors and chance levels --------------------------------------------------------------------------------
def test_sae_sharing_floor_pairs_different_classes():
    # two classes, two domains, ks = (1, 2): class 0 is drawn with features {0, 1} in both domains, class 1 with
    # {2, 3} in domain 0 and {0, 4} in domain 1 (its domain-1 images share a feature with class 0)
    h = np.zeros((2, 2, 6), dtype=np.int64)
    h[0, 0, [0, 1]] = [5, 4]
    h[0, 1, [0, 1]] = [5, 4]
    h[1, 0, [2, 3]] = [5, 4]
    h[1, 1, [0, 4]] = [5, 4]
    counts = np.ones((2, 2), dtype=np.int64)
    same = S.share_matrix(h, counts, ks=(1, 2))
    floor = S.share_matrix(h, counts, ks=(1, 2), mismatched=True)
    # same class: class 0 shares everything (1), class 1 nothing (0)
    assert same[0, 1] == pytest.approx(0.5)
    # different classes, domain 0 -> domain 1: (c0 in d0, c1 in d1) shares feature 0 at k = 1 and 2; (c1, c0) none
    assert floor[0, 1] == pytest.approx(np.mean([np.mean([1 / 1, 1 / 2]), 0.0]))
    assert floor[1, 0] == pytest.approx(floor[0, 1])


def test_cka_of_unrelated_class_means_scatters_around_zero_with_negative_values():
    """The bound the report states: with 10 class means the unbiased CKA of representations that share nothing is
    centred at 0 and spreads to about +-0.35 (95%), so negative values down to -0.3 are its noise, not
    anti-similarity."""
    rng = np.random.default_rng(0)
    for kernel in K.KERNELS:
        v = np.array([K.cka(rng.normal(size=(10, 64)), rng.normal(size=(10, 64)), kernel) for _ in range(300)])
        lo, hi = np.percentile(v, [2.5, 97.5])
        assert abs(v.mean()) < 0.05 and 0.35 < (v < 0).mean() < 0.65
        assert -0.45 < lo < -0.2 and 0.2 < hi < 0.45


def test_cka_floor_breaks_only_the_class_correspondence():
    rng = np.random.default_rng(1)
    means = np.zeros((len(DOMAINS), 10, 32))
    means[0] = rng.normal(size=(10, 32))
    means[1] = means[0] @ np.linalg.qr(rng.normal(size=(32, 32)))[0] * 2.0  # same class geometry, rotated
    present = np.ones((len(DOMAINS), 10), dtype=bool)
    idx = list(range(10))
    assert K.cka_matrix(means, present, idx, "linear")[0, 1] == pytest.approx(1.0, abs=1e-9)
    floor = K.cka_floor(means, present, idx, "linear", 0, 1)
    assert len(floor) == 9 and abs(np.mean(floor)) < 0.15  # classes mismatched: nothing class-specific is left
    res, floors = K.cka_by_layer({"l": np.repeat(means[:2].reshape(20, 32), 1, axis=0)},
                                 np.repeat(np.array(DOMAINS[:2]), 10), np.tile(np.arange(10), 2), DOMAINS,
                                 {"all": idx}, 10, ["linear"], floor_row=0)
    assert floors["linear"]["all"]["l"][DOMAINS[1]] == pytest.approx(floor, abs=1e-6)
    assert set(floors["linear"]["all"]["l"]) == set(DOMAINS[1:])


def test_node_jaccard_chance_matches_simulation():
    rng = np.random.default_rng(0)
    for channels, kept in ((16, 2), (64, 7), (512, 52)):
        sim = np.mean([C.jaccard(rng.choice(channels, kept, replace=False), rng.choice(channels, kept, replace=False))
                       for _ in range(4000)])
        assert C.jaccard_chance(channels, kept) == pytest.approx(sim, abs=0.01)
    assert C.jaccard_chance(10, 10) == 1.0


def test_domain_matrix_floor_uses_other_classes_only():
    groups = {"real|0": {"nodes": {"l": [1, 2]}}, "real|1": {"nodes": {"l": [3, 4]}},
              "sketch|0": {"nodes": {"l": [1, 2]}}, "sketch|1": {"nodes": {"l": [3, 5]}}}
    r, s = DOMAINS.index("real"), DOMAINS.index("sketch")
    same = C.domain_jaccard(groups, ["l"], DOMAINS, [0, 1], "nodes")["l"]
    floor = C.domain_jaccard(groups, ["l"], DOMAINS, [0, 1], "nodes", mismatched=True)["l"]
    assert same[r][s] == pytest.approx((1.0 + 1 / 3) / 2)
    assert floor[r][s] == pytest.approx(0.0) and floor[r][r] == pytest.approx(0.0)


# --- whole circuits ------------------------------------------------------------------------------------------
def _rec(nodes, edges):
    return {"nodes": nodes, "edges": edges}


def test_whole_circuit_wl_kernel_sees_nodes_and_wiring():
    layers = ["a", "b", "c"]
    base = _rec({"a": [0, 1], "b": [2, 3], "c": [4]}, {"b": [[0, 2], [1, 3]], "c": [[2, 4], [3, 4]]})
    rewired = _rec({"a": [0, 1], "b": [2, 3], "c": [4]}, {"b": [[1, 2], [0, 3]], "c": [[2, 4], [3, 4]]})
    other = _rec({"a": [5, 6], "b": [7, 8], "c": [9]}, {"b": [[5, 7], [6, 8]], "c": [[7, 9], [8, 9]]})
    f = {k: C.wl_features(*C.circuit_graph(r, layers), iterations=2) for k, r in
         (("base", base), ("rewired", rewired), ("other", other))}
    assert C.wl_similarity(f["base"], f["base"]) == pytest.approx(1.0)
    assert C.wl_similarity(f["base"], f["other"]) == 0.0
    # the same nodes wired differently: iteration 0 matches, refinements partly do not
    assert 1 / 3 <= C.wl_similarity(f["base"], f["rewired"]) < 0.9
    assert {it for it, _ in f["base"]} == {0, 1, 2}  # exactly h = 2 refinements (the authors' "h2" ran three)
    groups = {"real|0": base, "sketch|0": rewired, "real|1": other, "sketch|1": other}
    whole = C.whole_circuit_similarities(groups, layers, DOMAINS, [0, 1])
    r, s = DOMAINS.index("real"), DOMAINS.index("sketch")
    assert whole["wl"][r][s] == pytest.approx(np.mean([C.wl_similarity(f["base"], f["rewired"]), 1.0]), abs=1e-6)
    assert whole["node_jaccard"][r][s] == pytest.approx(1.0) and whole["wl_floor"][r][s] == pytest.approx(0.0)


# --- integrated gradients: the completeness gap bounded by what it changes -----------------------------------


def test_kept_nodes_at_the_papers_ten_steps_are_those_of_converged_attributions(tiny_rn):
    """Integrated gradients at 10 steps leave a completeness gap, but the circuits only keep the top 10% of
    channels by |attribution|: those are (almost) the channels 64 steps keep."""
    from clipgen.analyze.activations import stages
    from clipgen.models.zeroshot import normalize_images

    imgs = np.random.default_rng(3).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    x, labels = normalize_images(torch.from_numpy(imgs)), torch.arange(8) % 4
    class_emb = torch.nn.functional.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    metric, st = C.true_class_logit(class_emb, 50.0), stages(tiny_rn.visual)
    kept = {}
    for steps in (10, 64):
        attrs, _, _ = C.node_attributions(st, x, labels, metric, steps)
        kept[steps] = [C.top_nodes(a.double().mean(0).numpy(), 0.1) for a in attrs]
    overlap = [C.jaccard(a, b) for a, b in zip(kept[10], kept[64])]
    assert min(overlap) >= 0.75 and np.mean(overlap) >= 0.9, overlap


# --- rank statistics -----------------------------------------------------------------------------------------
def test_spearman_handles_ties_and_constants():
    assert R.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 2, 4], [4, 3, 3, 1]) == pytest.approx(-1.0)
    assert math.isnan(R.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(R.spearman([1, 2], [1, 2]))


def test_permutations_shuffle_only_within_a_seed():
    seeds = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    perms = R.within_seed_permutations(seeds, 200, seed=0)
    assert all(np.array_equal(seeds[p], seeds) for p in perms)  # every run keeps its seed's positions
    assert len({tuple(p) for p in perms}) > 20
    assert np.array_equal(perms, R.within_seed_permutations(seeds, 200, seed=0))  # seeded


def _study(seed_effect: float, recipe_effect: float, rng, seed_spread: float = 3.0) -> tuple:
    """5 seeds x 5 recipes: accuracy = seed + recipe + noise; the measure copies the given effects."""
    seeds, recipes = np.repeat(np.arange(5), 5), np.tile(np.arange(5), 5)
    s_eff, r_eff = rng.normal(size=5) * seed_spread, np.arange(5) * 1.0
    acc = s_eff[seeds] + r_eff[recipes] + 0.1 * rng.normal(size=25)
    measure = seed_effect * s_eff[seeds] + recipe_effect * r_eff[recipes] + 0.1 * rng.normal(size=25)
    return measure, acc, seeds, recipes


def test_correlation_tracks_recipes_not_seeds():
    rng = np.random.default_rng(0)
    # a measure that follows the recipes: strong rho, tiny permutation p, interval above 0
    m, acc, seeds, recipes = _study(0.0, 1.0, rng)
    (res,) = R.correlation_by_layer(m[:, None], acc, seeds, recipes, n_perm=2000, n_boot=500, seed=0)
    assert res["rho"] > 0.3 and res["p_perm"] < 0.01 and res["boot_low"] > 0 and res["n"] == 25
    # a measure that follows only the seeds (a good seed is good at everything): rho across runs is large, but
    # shuffling within seeds keeps it, so the permutation test does not credit it
    m, acc, seeds, recipes = _study(1.0, 0.0, rng)
    (res,) = R.correlation_by_layer(m[:, None], acc, seeds, recipes, n_perm=2000, n_boot=500, seed=0)
    assert res["rho"] > 0.5 and res["p_perm"] > 0.2
    assert abs(res["rho_within_recipe"]) > 0.5  # among seeds of a recipe it does track the accuracy


def test_family_wise_p_over_layers_is_never_below_the_layer_p():
    rng = np.random.default_rng(2)
    m, acc, seeds, recipes = _study(0.0, 1.0, rng, seed_spread=0.5)
    layers = np.column_stack([m, rng.normal(size=25), rng.normal(size=25), np.where(np.arange(25) < 3, np.nan, m)])
    res = R.correlation_by_layer(layers, acc, seeds, recipes, n_perm=1000, n_boot=200, seed=0)
    assert all(r["p_family"] >= r["p_perm"] - 1e-12 for r in res)
    assert res[0]["p_family"] < 0.01 and res[1]["p_perm"] > 0.01 and res[3]["n"] == 22


# --- the report's measure table ------------------------------------------------------------------------------
def test_split_epochs_counts_each_untrained_checkpoint_once():
    from clipgen.report.analyses import split_epochs

    rows = []
    for kind in ("cg_low", "cg_high"):
        for seed in (0, 1):
            for epoch, value in ((0, 0.1 + seed), (16, 0.5)):
                rows.append({"run": f"{kind}-{seed}", "recipe_kind": kind, "seed": seed, "epoch": epoch,
                             "weights_sha256": f"w{seed}" if epoch == 0 else f"{kind}{seed}", "measure": "sae",
                             "layer": "attnpool", "value": value})
    trained, untrained = split_epochs(pd.DataFrame(rows))
    assert sorted(trained["run"]) == ["cg_high-0", "cg_high-1", "cg_low-0", "cg_low-1"]
    assert sorted(untrained["value"]) == [0.1, 1.1]  # one per seed, not one per run


def test_paired_differences_are_a_minus_b_within_a_seed():
    from clipgen.report.analyses import correlations, paired

    rows = []
    for seed in range(4):
        for kind, shift in (("cg_high", 0.0), ("lod", 0.2), ("cg_low", -0.1)):
            value = 0.3 + 0.1 * seed + shift  # a seed effect shared by the recipes: pairing removes it
            rows.append({"run": f"{kind}-{seed}", "recipe_kind": kind, "seed": seed, "measure": "cka_linear",
                         "layer": "layer2.0", "layer_index": 2, "value": value, "floor": 0.1 * seed,
                         "accuracy": value})
    table = pd.DataFrame(rows)
    pairs = paired(table).set_index(["kind_a", "kind_b"])
    assert pairs.loc[("lod", "cg_high"), "mean"] == pytest.approx(0.2)
    assert pairs.loc[("lod", "cg_high"), "std"] == pytest.approx(0.0, abs=1e-12)  # the seed effect is gone
    assert pairs.loc[("cg_high", "cg_low"), "mean"] == pytest.approx(0.1) and pairs.loc[("cg_high", "cg_low"), "n"] == 4
    assert ("cg_high_pseudo", "cg_high") not in pairs.index  # no pseudo runs: no such row
    corr = correlations(table).set_index("variant")
    assert corr.loc["value", "rho"] == pytest.approx(1.0) and corr.loc["value", "n"] == 12
    # above its floor the measure has lost the seed effect the accuracy keeps: a weaker, still positive rho
    assert 0 < corr.loc["above_floor", "rho"] < corr.loc["value", "rho"]


def test_world_mech_analyses_exactly_the_world_study_runs(tmp_path):
    """experiment=world_mech adds analyses to the world study: the same 25 run directories (a root where the world
    study ran trains and evaluates nothing more), analysed at the untrained and the last epoch."""
    from clipgen.recipes.grid import run_dir_of, study_runs

    from conftest import make_cfg

    def runs(experiment):
        cfg = make_cfg(tmp_path, f"experiment={experiment}")
        return cfg, [run_dir_of(sub) for _, sub in study_runs(cfg)]

    mech, mech_runs = runs("world_mech")
    _, world_study_runs = runs("world_study")
    assert mech_runs == world_study_runs and len(mech_runs) == 25
    assert mech.study.analyze and list(mech.analysis.epochs) == [0, -1] and mech.study.name == "world-mech"
    assert not any(tmp_path.iterdir())  # composing and naming wrote nothing


def test_accuracy_is_the_analysed_test_domains_own():
    """A natural-only run is evaluated on every test domain's task; its analyses (test domain sketch) must get
    sketch-lso-ood at the analysed epoch, not a mean over the tasks."""
    from clipgen.analyze.measures import with_accuracy

    long = pd.DataFrame([
        {"run": "nat", "task": "domainnet-sketch", "test_domain": "sketch", "epoch": 16, "metric": "sketch-lso-ood",
         "value": 0.12},
        {"run": "nat", "task": "domainnet-clipart", "test_domain": "clipart", "epoch": 16,
         "metric": "clipart-lso-ood", "value": 0.30},
        {"run": "nat", "task": "domainnet-sketch", "test_domain": "sketch", "epoch": 0, "metric": "sketch-lso-ood",
         "value": 0.10},
        {"run": "nat", "task": "domainnet-sketch", "test_domain": "sketch", "epoch": 16, "metric": "real-lso-ood",
         "value": 0.60}])
    table = pd.DataFrame([{"run": "nat", "test_domain": "sketch", "epoch": e, "measure": "sae", "value": 0.3}
                          for e in (0, 4, 16)])
    got = with_accuracy(table, long).set_index("epoch")["accuracy"]
    assert got[16] == pytest.approx(0.12) and got[0] == pytest.approx(0.10) and math.isnan(got[4])


def test_leave_one_recipe_out_finds_a_correlation_made_by_one_recipe():
    # four recipes with no relation among them, and one far below in both measure and accuracy
    rng = np.random.default_rng(3)
    recipes = np.repeat(np.arange(5), 5)
    seeds = np.tile(np.arange(5), 5)
    m, acc = rng.normal(size=25), rng.normal(size=25)
    m[recipes == 0] -= 10
    acc[recipes == 0] -= 10
    (res,) = R.correlation_by_layer(m[:, None], acc, seeds, recipes, n_perm=200, n_boot=50, seed=0)
    assert res["rho"] > 0.4 and res["loo_recipe"] == "0" and abs(res["rho_loo"]) < 0.4
