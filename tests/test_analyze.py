"""clipgen-analyze (protocol §7): CKA / HSIC against direct formulas, the SAE on a planted dictionary, feature sharing
on hand-built histograms, integrated-gradient completeness, circuit structure, one-pass activation hooks, and
every analysis end to end on trained synthetic-world runs (plus the report section)."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from clipgen.analyze import activations as A
from clipgen.analyze import circuits as C
from clipgen.analyze import cka as K
from clipgen.analyze import sharing as S
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS

from conftest import make_cfg, scratch_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- CKA / HSIC ----------------------------------------------------------------------------------------------
def _hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) Theorem 2 written out: the mean over ordered 4-tuples of distinct indices of
    k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n = len(k)
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


def test_unbiased_hsic_matches_the_direct_small_n_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 5))
    for kernel in K.KERNELS:
        k, l = K.gram(x, kernel), K.gram(y, kernel)
        assert K.hsic_unbiased(k, l) == pytest.approx(_hsic_u_statistic(k, l), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        K.hsic_unbiased(np.eye(3), np.eye(3))


def test_cka_identity_orthogonal_and_scale_invariance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 8))
    y = np.tanh(x @ rng.normal(size=(8, 6))) + 0.3 * rng.normal(size=(20, 6))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    for kernel in K.KERNELS:
        assert K.cka(x, x, kernel) == pytest.approx(1.0, abs=1e-12)
        base = K.cka(x, y, kernel)
        assert 0.05 < base < 0.99  # a non-trivial value, so invariance is not vacuous
        assert K.cka(x @ q, y, kernel) == pytest.approx(base, abs=1e-10)
        assert K.cka(3.7 * x, 0.2 * y, kernel) == pytest.approx(base, abs=1e-10)
    # Not invariant to a non-isotropic scaling (linear kernel): the check above can fail.
    assert K.cka(x * np.arange(1, 9), y, "linear") != pytest.approx(K.cka(x, y, "linear"), abs=1e-3)
    assert np.isnan(K.cka(x[:3], y[:3]))  # the unbiased estimator needs 4 items


def test_cka_matrix_uses_the_class_list_it_is_given():
    """The original code reused a stale loop variable as the class list; each subset must use its own."""
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(6 * 8 * 3, 10))
    domains = np.repeat(np.array(DOMAINS), 8 * 3)
    labels = np.tile(np.repeat(np.arange(8), 3), 6)
    means, present = K.group_means(acts, domains, labels, DOMAINS, 8)
    held, other = [0, 2, 4, 6], [1, 3, 5, 7]
    res, _ = K.cka_by_layer({"l": acts}, domains, labels, DOMAINS, {"held": held, "other": other}, 8, ["linear"])
    for subset, idx in (("held", held), ("other", other)):
        m = res["linear"][subset]["l"]
        for a, b in [(0, 5), (3, 4)]:
            assert m[a][b] == pytest.approx(K.cka(means[a, idx], means[b, idx]), abs=1e-6)
    assert res["linear"]["held"]["l"][0][5] != pytest.approx(res["linear"]["other"]["l"][0][5], abs=1e-3)


# --- SAE and feature sharing ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_sae_recovers_a_planted_sparse_dictionary():
    from clipgen.analyze.sae import train_sae

    rng = np.random.default_rng(0)
    d, m, n = 16, 24, 4000
    atoms = rng.normal(size=(d, m))
    atoms /= np.linalg.norm(atoms, axis=0)
    codes = np.zeros((m, n))
    for i in range(n):
        codes[rng.choice(m, 2, replace=False), i] = rng.uniform(0.5, 1.5, 2)
    x = (atoms @ codes).T

    def best_match(model):
        return (atoms.T @ model.w_dec.detach().numpy()).max(axis=1)

    # l1 = 0.3 / d: the reconstruction error is averaged over the d = 16 dimensions (protocol §7)
    untrained, _ = train_sae(x, 48, 0, 512, 1e-2, 0.3 / d, seed=0)
    assert (best_match(untrained) > 0.9).mean() < 0.5  # random columns do not match by chance
    sae, summary = train_sae(x, 48, 1000, 512, 1e-2, 0.3 / d, seed=0)
    assert best_match(sae).min() > 0.9  # every planted atom has a decoder column
    assert np.allclose(np.linalg.norm(sae.w_dec.detach().numpy(), axis=0), 1.0, atol=1e-5)
    assert summary["mean_l0"] < 8 and summary["explained_variance"] > 0.9
    again, _ = train_sae(x, 48, 1000, 512, 1e-2, 0.3 / d, seed=0)
    assert torch.equal(again.w_dec, sae.w_dec)  # seeded


def _hist(*domain_counts):
    """One class, a domain per argument: ``{feature: count}``."""
    h = np.zeros((1, len(domain_counts), 12), dtype=np.int64)
    for di, counts in enumerate(domain_counts):
        for f, c in counts.items():
            h[0, di, f] = c
    return h


def test_feature_sharing_matches_hand_computed_values_for_every_row():
    # Three domains, features ranked by count; ks = (1, 2, 3) keeps the arithmetic by hand.
    h = _hist({0: 9, 1: 8, 2: 7, 3: 1},      # A: top1 {0}, top2 {0,1}, top3 {0,1,2}
              {0: 9, 2: 8, 5: 7},            # B: {0}, {0,2}, {0,2,5}
              {4: 9, 5: 8, 2: 7})            # C: {4}, {4,5}, {4,5,2}
    counts = np.ones((1, 3), dtype=np.int64)
    m = S.share_matrix(h, counts, ks=(1, 2, 3))
    ab = np.mean([1 / 1, 1 / 2, 2 / 3])
    ac = np.mean([0 / 1, 0 / 2, 1 / 3])
    bc = np.mean([0 / 1, 0 / 2, 2 / 3])
    expected = np.array([[1, ab, ac], [ab, 1, bc], [ac, bc, 1]])
    assert np.allclose(m, expected)
    scores = S.domain_scores(m, ["A", "B", "C"])
    assert scores["A"] == pytest.approx((ab + ac) / 2)
    assert scores["B"] == pytest.approx((ab + bc) / 2)
    assert scores["C"] == pytest.approx((ac + bc) / 2)
    assert len({round(v, 6) for v in scores.values()}) == 3  # a score computed for a stale row would repeat


def test_histograms_count_each_images_top_active_features_and_skip_absent_classes():
    codes = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 4.0]])
    h, counts = S.histograms(codes, np.array(["real", "real", "sketch"]), np.array([0, 0, 0]),
                             ["real", "sketch"], [0, 1], top_k_active=2)
    assert h[0, 0].tolist() == [1, 1, 0, 1]  # image 0: features 1, 3; image 1: only feature 0 is active
    assert h[0, 1].tolist() == [1, 0, 0, 1]  # ties (0 and 1 at 1.0): lower index first
    assert counts.tolist() == [[2, 1], [0, 0]]
    m = S.share_matrix(h, counts, ks=(1,))
    assert np.isfinite(m[0, 1])


def test_concept_names_take_the_closest_vocabulary_entry(tmp_path):
    dec = np.array([[1.0, 0.0], [0.0, -1.0]])  # columns are features
    txt = np.array([[0.0, 2.0], [3.0, 0.1], [0.0, -1.0]])
    names = S.concept_names(dec, txt, ["up", "right", "down"], [0, 1])
    assert names[0]["concept"] == "right" and names[1]["concept"] == "down"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# concepts\nstripes\n\nwheels\nstripes\n")
    assert S.read_vocab(vocab) == ["stripes", "wheels"]
    with pytest.raises(ClipgenError, match="sae_vocab_file"):
        S.read_vocab(tmp_path / "missing.txt")


# --- activations, IG, circuits on a tiny model ---------------------------------------------------------------


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


@pytest.mark.slow
def test_one_pass_extraction_equals_one_pass_per_layer_and_stages_compose(tiny_rn):
    from clipgen.models.factory import create_clip
    from clipgen.models.zeroshot import normalize_images

    imgs = _images(10)
    names = A.layer_names(tiny_rn.visual)
    assert names == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "attnpool"]
    one = A.extract(tiny_rn, imgs, batch_size=4)
    per = A.extract_one_pass_per_layer(tiny_rn, imgs, batch_size=4)
    assert list(one) == names and one["layer2.0"].shape == (10, 128)
    for n in names:
        assert np.allclose(one[n], per[n], atol=1e-6)
    x = normalize_images(torch.from_numpy(imgs))
    with torch.no_grad():
        assert torch.allclose(C.run_from(A.stages(tiny_rn.visual), 0, x), tiny_rn.visual(x), atol=1e-5)
        vit, _ = create_clip("clipgen-tiny-vit", 32)
        vit.eval()
        assert A.layer_names(vit.visual) == ["block0", "block1", "head"]
        assert torch.allclose(C.run_from(A.stages(vit.visual), 0, x), vit.visual(x), atol=1e-5)
    assert A.extract(vit, imgs, ["block1"])["block1"].shape == (10, 64)
    with pytest.raises(ClipgenError, match="unknown layer"):
        A.extract(tiny_rn, imgs, ["layer9.0"])


def test_activation_cache_is_keyed_by_checkpoint_images_and_layers(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"stem": np.ones((2, 3), np.float32)}

    got = A.cached_extract(tmp_path, "sha-a", ["x", "y"], ["stem"], compute)
    again = A.cached_extract(tmp_path, "sha-a", ["x", "y"], ["stem"], compute)
    assert len(calls) == 1 and np.array_equal(got["stem"], again["stem"])
    A.cached_extract(tmp_path, "sha-b", ["x", "y"], ["stem"], compute)  # another checkpoint
    A.cached_extract(tmp_path, "sha-a", ["x", "z"], ["stem"], compute)  # other images
    assert len(calls) == 3


@pytest.mark.slow
def test_integrated_gradients_are_complete_on_a_tiny_model(tiny_rn):
    from clipgen.models.zeroshot import normalize_images

    x = normalize_images(torch.from_numpy(_images(6, seed=3)))
    labels = torch.arange(6) % 4
    class_emb = torch.nn.functional.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    metric = C.true_class_logit(class_emb, 50.0)
    st = A.stages(tiny_rn.visual)
    gaps = {}
    for steps in (2, 64):
        attrs, full, zeros = C.node_attributions(st, x, labels, metric, steps)
        gaps[steps] = [float((a.sum(dim=1) - (full - z)).abs().max()) for a, z in zip(attrs, zeros)]
        spans = [float((full - z).abs().mean()) for z in zeros]
    # With enough steps the attributions add up to M(x) - M(baseline) at every layer ...
    assert all(g <= 0.02 * max(s, 1.0) for g, s in zip(gaps[64], spans))
    # ... and the Riemann error shrinks with the number of steps (it is not trivially exact).
    assert sum(gaps[2]) > 5 * sum(gaps[64])
    # The metric at the image is the zero-shot true-class logit (scale x cosine).
    with torch.no_grad():
        emb = torch.nn.functional.normalize(tiny_rn.visual(x), dim=-1)
    assert torch.allclose(full, 50.0 * (emb * class_emb[labels]).sum(-1), atol=1e-4)
    # Edge attributions are complete too: sum over upstream channels = change of the downstream node value.
    acts = C.forward_all(st, x)
    targets = torch.tensor([[0, 5, 9]] * 6)
    w = C.edge_attributions(st, acts[1], 2, targets, steps=64)
    with torch.no_grad():
        s_full = C._channels_sum(acts[2])[:, [0, 5, 9]]
        s_zero = C._channels_sum(st[2][1](torch.zeros_like(acts[1])))[:, [0, 5, 9]]
    assert torch.allclose(w.sum(dim=2), s_full - s_zero, atol=0.02 * float((s_full - s_zero).abs().max()) + 1e-3)


def test_circuit_edges_join_consecutive_layers_only_and_rank_by_magnitude(tiny_rn):
    st = A.stages(tiny_rn.visual)
    class_emb = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = np.array([0, 1, 0, 1, 0, 1])
    groups = np.array(["real|0", "real|1", "real|0", "sketch|1", "sketch|0", "sketch|1"])
    res = C.analyse_circuits(st, _images(6), labels, groups, C.true_class_logit(class_emb, 50.0), steps=3,
                             top_frac=0.1, top_edges=3)
    names = res["layers"]
    for rec in res["groups"].values():
        assert list(rec["edges"]) == names[1:]  # no edge into the first layer: nothing wraps around
        for li, name in enumerate(names[1:], start=1):
            up, down = set(rec["nodes"][names[li - 1]]), set(rec["nodes"][name])
            assert rec["edges"][name] and all(i in up and j in down for i, j in rec["edges"][name])
            per_node = {}
            for i, j in rec["edges"][name]:
                per_node.setdefault(j, []).append(i)
            assert all(len(v) == min(3, len(up)) for v in per_node.values())
        assert [len(rec["nodes"][n]) for n in names] == [2, 7, 13, 26, 52, 7]  # ceil(10%) of 16..512 channels
    with pytest.raises(ValueError):
        C.edge_attributions(st, torch.zeros(1, 3, 32, 32), 0, torch.zeros(1, 1, dtype=torch.long))
    # Top-k by |weight|: a large negative weight wins over small positive ones.
    w = np.array([[0.1, -5.0, 0.2, 0.3]])
    assert C.circuit_edges(w, [0, 1, 2, 3], [7], top_edges=2) == [(1, 7), (3, 7)]
    assert C.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    jac = C.domain_jaccard(res["groups"], names, DOMAINS, [0, 1], "nodes")
    r, s = DOMAINS.index("real"), DOMAINS.index("sketch")
    assert jac["stem"][r][r] == 1.0 and 0.0 <= jac["stem"][r][s] <= 1.0 and jac["stem"][0][0] is None


def test_vit_circuits_use_block_channels():
    from clipgen.models.factory import create_clip
    from clipgen.models.zeroshot import normalize_images

    torch.manual_seed(0)
    vit, _ = create_clip("clipgen-tiny-vit", 32)
    vit.eval()
    st = A.stages(vit.visual)
    class_emb = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    metric = C.true_class_logit(class_emb, 20.0)
    x = normalize_images(torch.from_numpy(_images(3)))
    attrs, full, zeros = C.node_attributions(st, x, torch.tensor([0, 1, 0]), metric, steps=4)
    assert [a.shape[1] for a in attrs] == [64, 64, 64] and all(torch.isfinite(a).all() for a in attrs)
    # The last layer feeds the metric linearly, so its attributions are complete even for a ViT. (Inside the
    # tower, pre-LN blocks make the path from a zero activation jump at 0, which a zero baseline cannot see.)
    assert torch.allclose(attrs[-1].sum(dim=1), full - zeros[-1], atol=1e-4)
    res = C.analyse_circuits(st, _images(3), np.array([0, 1, 0]), np.array(["real|0", "real|1", "real|0"]), metric,
                             steps=2)
    assert res["layers"] == ["block0", "block1", "head"] and list(res["groups"]["real|0"]["edges"]) == ["block1",
                                                                                                        "head"]


def test_umap_leaves_torchs_thread_count_as_it_was():
    """numba's OpenMP layer shares torch's libgomp and sets the calling thread's OpenMP threads to its own count;
    analysis.threads must hold for every analysis after a UMAP (3: a count numba would not pick here)."""
    from clipgen.analyze import geometry as G
    from clipgen.procs import torch_threads

    with torch_threads(3):
        x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
        assert G.umap_embed(x, seed=0).shape == (60, 2)
        assert torch.get_num_threads() == 3


def test_umap_neighbours_are_each_points_exact_cosine_neighbours():
    from clipgen.analyze import geometry as G

    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    idx, dist = G.cosine_neighbours(x, 5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = 1.0 - unit @ unit.T
    assert idx.shape == dist.shape == (50, 5) and (idx[:, 0] == np.arange(50)).all()  # itself first, at 0
    assert np.allclose(dist, np.take_along_axis(full, idx, axis=1), atol=1e-5)
    assert np.allclose(np.sort(full, axis=1)[:, :5], dist, atol=1e-5)  # the 5 smallest, in order


def test_seeded_umap_subsample_and_domain_mean_distances():
    from clipgen.analyze import geometry as G

    assert np.array_equal(G.seeded_subsample(100, 10, 3), G.seeded_subsample(100, 10, 3))
    assert not np.array_equal(G.seeded_subsample(100, 10, 3), G.seeded_subsample(100, 10, 4))
    emb = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 5.0]])
    doms = np.array(["real", "real", "sketch", "sketch"])
    labels = np.array([0, 1, 0, 1])
    dist = G.domain_mean_distances(emb, doms, DOMAINS)
    r, s = DOMAINS.index("real"), DOMAINS.index("sketch")
    assert dist[r, s] == pytest.approx(np.hypot(1.0, 4.0)) and np.isnan(dist[0, r])
    cond = G.class_conditional_distances(emb, doms, labels, DOMAINS, [0, 1])
    assert cond[r, s] == pytest.approx((3.0 + np.hypot(2.0, 5.0)) / 2)
    floor = G.class_conditional_distances(emb, doms, labels, DOMAINS, [0, 1], mismatched=True)
    assert floor[r, s] == pytest.approx((5.0 + np.hypot(2.0, 3.0)) / 2)  # class 0 vs class 1 and 1 vs 0
    diffs = G.per_dimension_differences(emb, doms, DOMAINS, "real")
    assert diffs["sketch"] == pytest.approx([-1.0, 4.0])


# --- end to end on the synthetic world -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """Two seeds of CG-high on a tiny world with four held-out classes (so CKA over C2 has >= 4 classes)."""
    from clipgen.launch.study import run_study

    with scratch_dir(tmp_path_factory, "analyze_root") as root:
        run_study(make_cfg(root, "debug=smoke", "world.num_heldout=4", "study.name=an", "study.recipes=[cg_high]",
                           "study.seeds=[0,1]", "trainer.epochs=1"))
        yield root


def _check_results(adir, epoch: int, words: list[str]) -> dict:
    results = {n: json.loads((adir / f"{n}.json").read_text()) for n in ("sae", "geometry", "cka", "circuits")}
    for r in results.values():
        assert r["epoch"] == epoch and r["version"] == 2 and r["test_domain"] == "sketch"
        assert len(r["checkpoint_sha256"]) == 64 and len(r["weights_sha256"]) == 64 and r["cpu_seconds"] >= 0
        assert r["figures"] and all((adir / f).stat().st_size > 1000 for f in r["figures"])
    sae = results["sae"]["subsets"]["heldout"]
    assert sae["test_domain_score"] == sae["domain_scores"]["sketch"] is not None
    assert len(sae["matrix"]) == 6 and sae["matrix"][5][5] is not None and sae["test_domain_floor"] is not None
    assert results["sae"]["sae"]["loss"].startswith("squared error averaged")
    assert results["sae"]["vocabulary"]["size"] == len(words)
    assert {c["concept"] for c in results["sae"].get("concepts", {}).values()} <= set(words)
    geo = results["geometry"]
    assert geo["eval_check"]["images"] > 0 and geo["eval_check"]["max_abs_diff"] < 1e-2
    if geo["settings"]["umap"]:
        assert {"umap_all.png", "umap_no_quickdraw.png"} <= set(geo["figures"]) and geo["umap"]["all"]["domains"]
    assert geo["class_conditional_distance_floor"]["heldout"][5][4] is not None
    cka = results["cka"]
    assert cka["layers"] == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "attnpool"]
    for kernel in ("linear", "rbf"):
        for subset in ("all", "heldout", "other"):
            m = cka["cka"][kernel][subset]["attnpool"]
            assert m[5][5] == pytest.approx(1.0) and m[5][4] is not None
        assert len(cka["floor"][kernel]["heldout"]["stem"]["real"]) == 3  # 4 held-out classes: 3 shifts
    circ = results["circuits"]
    assert set(circ["node_jaccard"]) == set(cka["layers"]) and "stem" not in circ["circuit_jaccard"]
    assert set(circ["node_jaccard_floor"]) == set(cka["layers"]) and circ["groups"]
    assert len(circ["circuit_classes"]) == 4 and 0 < circ["node_jaccard_chance"]["layer4.0"] < 0.1
    assert circ["whole_circuit"]["wl"][5][4] is not None and circ["whole_circuit"]["wl"][5][5] == 1.0
    assert set(circ["completeness"]["per_layer"]) == set(cka["layers"])
    return results


def _analyze(root, vocab) -> dict:
    """Run A, every analysis at its last epoch and the untrained epoch 0; run B, CKA at its last epoch (what the
    report's two-run table reads). Fast settings, fewer IG steps: the tests check structure; the steps' effect is
    tested in test_mech.py."""
    from clipgen.analyze.run import run_analyze

    runs = sorted((root / "runs").glob("*seed[0-9]"))
    over = ["debug=smoke", "world.num_heldout=4", "analysis=fast", "analysis.threads=1", "analysis.circuit_steps=5",
            f"analysis.sae_vocab_file={vocab}"]
    out = {}
    plan = ((runs[0], ["analysis.epochs=[0,-1]"]),
            (runs[1], ["analysis.epochs=[-1]", "analysis.umap=false", "analysis.analyses=[cka]"]))
    for run, extra in plan:
        cfg = make_cfg(root, *over, f"analysis.run_dirs=[{run}]", *extra)
        out[run.name] = run_analyze(cfg)["runs"][run.name]
    return {"runs": runs, "out": out, "over": over}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "concepts.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


WORDS = ["stripes", "wheels", "water", "pencil lines", "bright colours", "text"]


@pytest.mark.slow
def test_all_analyses_per_epoch_with_baselines_reruns_skip_and_shared_weights_are_copied(trained_root, vocab):
    import shutil

    from clipgen.analyze import store
    from clipgen.analyze.run import run_analyze

    words = WORDS
    done = _analyze(trained_root, vocab)
    runs, out = done["runs"], done["out"]
    assert sorted(out[runs[0].name]["epochs"]) == [0, 1] and sorted(out[runs[1].name]["epochs"]) == [1]
    for run, epochs in ((runs[0], (0, 1)), (runs[1], (1,))):
        res = out[run.name]
        assert all(v.startswith("computed") for r in res["epochs"].values() for v in r["analyses"].values()), res
        index = json.loads((run / "analysis" / "index.json").read_text())
        assert index["epochs"] == list(epochs) and index["last_dir"] == "epoch_001"
    for epoch in (0, 1):
        _check_results(store.epoch_dir(runs[0], epoch), epoch, words)
    assert sorted(p.name for p in store.epoch_dir(runs[1], 1).glob("*.json")) == ["cka.json"]  # what was asked
    again = _analyze(trained_root, vocab)["out"]
    assert all(v == "up to date" for r in again.values() for e in r["epochs"].values() for v in e["analyses"].values())

    # A run with the same weights (here: a copy under another name, as the epoch-0 checkpoints of two recipes
    # that share a seed are) gets the results copied, with its own provenance and figures.
    src = runs[0].name
    twin = trained_root / "runs" / "twin--seed0"
    shutil.copytree(trained_root / "runs" / src, twin, ignore=shutil.ignore_patterns("analysis"))
    meta = json.loads((twin / "meta.json").read_text())
    (twin / "meta.json").write_text(json.dumps({**meta, "run_name": twin.name, "recipe_kind": "lod"}))
    try:
        res = run_analyze(make_cfg(trained_root, *done["over"], f"analysis.run_dirs=[{twin}]", "analysis.epochs=[0]"))
        assert all(v == f"copied from {src} (same weights)" for v in res["runs"][twin.name]["analyses"].values())
        copied = _check_results(store.epoch_dir(twin, 0), 0, words)
        original = json.loads((store.epoch_dir(trained_root / "runs" / src, 0) / "cka.json").read_text())
        assert copied["cka"]["cka"] == original["cka"] and copied["cka"]["reused_from"] == src
        assert copied["cka"]["run"] == twin.name and copied["cka"]["recipe_kind"] == "lod"
    finally:
        shutil.rmtree(twin)


@pytest.mark.slow
def test_single_folder_results_are_moved_and_recomputed_and_the_report_reads_its_own_runs(trained_root, vocab,
                                                                                        tmp_path):
    from clipgen.analyze import store
    from clipgen.report.analyses import report_section
    from clipgen.analyze.run import run_analyze
    from clipgen.procs import torch_threads
    from clipgen.report.aggregate import collect

    done = _analyze(trained_root, vocab)  # current where the test above ran first
    runs, over = done["runs"], done["over"]
    # the layout before per-epoch folders: results and figures in analysis/ itself, version 1
    old, flat = store.epoch_dir(runs[1], 1), runs[1] / "analysis"
    res = json.loads((old / "cka.json").read_text())
    for f in res["figures"]:
        (old / f).replace(flat / f)
    (flat / "cka.json").write_text(json.dumps({**res, "version": 1, "key": "v1-key"}))
    (old / "cka.json").unlink()
    html = report_section(runs, tmp_path / "report", collect(trained_root / "runs", runs)[0])
    assert "1 runs hold analyses in the layout before per-epoch folders" in html
    with torch_threads(3):  # analysis.threads (1) holds inside run_analyze only
        again = run_analyze(make_cfg(trained_root, *over, f"analysis.run_dirs=[{runs[1]}]", "analysis.epochs=[-1]",
                                     "analysis.analyses=[cka]"))
        assert torch.get_num_threads() == 3
    assert again["runs"][runs[1].name]["analyses"]["cka"].startswith("computed")
    assert not (flat / "cka.json").exists() and json.loads((old / "cka.json").read_text())["version"] == 2

    html = report_section(runs, tmp_path / "report", collect(trained_root / "runs", runs)[0])
    assert html.startswith("<h2 id=analyses>") and "test domain sketch" in html and "before per-epoch" not in html
    assert "untrained (epoch 0)" in html and "node Jaccard" in html and "whole circuit" in html
    table = pd.read_csv(tmp_path / "report" / "analysis_measures.csv")
    assert set(table["epoch"]) == {0, 1} and set(table["run"]) == {r.name for r in runs}
    assert set(table.loc[table["epoch"] == 0, "run"]) == {runs[0].name}
    assert table.loc[table["epoch"] == 1, "accuracy"].notna().all()  # sketch-lso-ood of the analysed epoch
    one = report_section(runs[:1], tmp_path / "report1", collect(trained_root / "runs", runs[:1])[0])
    assert set(pd.read_csv(tmp_path / "report1" / "analysis_measures.csv")["run"]) == {runs[0].name} and one
    assert report_section([], tmp_path / "report2", collect(trained_root / "runs", [])[0]) == ""


@pytest.mark.slow
def test_bad_analysis_settings_fail_with_one_line(trained_root):
    from clipgen.analyze.run import run_analyze

    with pytest.raises(ClipgenError, match="analysis.analyses"):
        run_analyze(make_cfg(trained_root, "analysis.analyses=[sae,circuts]"))
    with pytest.raises(ClipgenError, match="not a run directory"):
        run_analyze(make_cfg(trained_root, f"analysis.run_dirs=[{trained_root}]"))
    with pytest.raises(ClipgenError, match="sae_vocab_file"):
        run_analyze(make_cfg(trained_root, "analysis.sae_vocab_file=/nonexistent/vocab.txt"))
    with pytest.raises(ClipgenError, match="analysis.epochs has 7"):
        run_analyze(make_cfg(trained_root, "debug=smoke", "world.num_heldout=4", "analysis.epochs=[7]"))
    with pytest.raises(ClipgenError, match="analysis.epochs"):
        run_analyze(make_cfg(trained_root, "analysis.epochs=[]"))
