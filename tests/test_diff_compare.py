"""The SAE generator (a crosscoder over both runs' embeddings) and the methods comparison over seeds
(``clipgen-diff`` with ``diff.contrasts``): the dictionary's loss and determinism, a planted difference found and
compiled to a slice the verifier judges, the comparison's statistics by hand, bad input, and a comparison of a
tiny trained study end to end (resumable, in the report)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import make_cfg, scratch_dir
from clipgen.diff import comparison as C
from clipgen.diff import synthetic as syn
from clipgen.errors import ClipgenError
from clipgen.stats import t_interval

DOMAINS = ["clipart", "quickdraw", "real", "sketch"]
CLASSES = ["aircraft carrier", "axe", "banana", "barn", "bed", "bicycle", "dolphin", "duck", "horse", "pants"]
HELDOUT = ["aircraft carrier", "axe", "banana"]


# --- the dictionary -----------------------------------------------------------------------------------------------
def _sparse_data(n=1500, dims=(12, 12), k=24, seed=0):
    """Rows that are sparse combinations (3 of k atoms) of a dictionary with a part in each run's block."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(k, sum(dims)))
    codes = np.zeros((n, k))
    for i in range(n):
        codes[i, rng.choice(k, size=3, replace=False)] = rng.uniform(0.5, 1.5, size=3)
    x = codes @ atoms + 0.05 * rng.normal(size=(n, sum(dims)))
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


def test_crosscoder_loss_is_averaged_over_dimensions():
    import torch

    from clipgen.diff.crosscoder import Crosscoder, crosscoder_loss

    x = torch.as_tensor(_sparse_data(n=50))
    model = Crosscoder((12, 12), 16, seed=0)
    with torch.no_grad():
        model.w_dec.zero_()  # nothing is reconstructed: the error is the data itself
    loss, parts = crosscoder_loss(model, x, l1=0.5)
    assert parts["reconstruction"] == pytest.approx(float(x.pow(2).mean()), rel=1e-6)  # mean, not sum over dims
    assert parts["l1"] == 0.0 and loss.item() == pytest.approx(parts["reconstruction"], rel=1e-6)


def test_crosscoder_fits_sparse_data_deterministically():
    from clipgen.diff.crosscoder import train_crosscoder

    x = _sparse_data()
    kw = dict(steps=300, batch_size=256, lr=3e-3, l1=0.02)
    m1, s1 = train_crosscoder(x, (12, 12), 64, seed=0, **kw)
    m2, _ = train_crosscoder(x, (12, 12), 64, seed=0, **kw)
    m3, _ = train_crosscoder(x, (12, 12), 64, seed=1, **kw)
    assert s1["fvu"] < 0.2 and s1["l0"] < 16 and s1["last"]["reconstruction"] < s1["first"]["reconstruction"] / 4
    assert all(np.array_equal(a.detach().numpy(), b.detach().numpy()) for a, b in zip(m1.parameters(), m2.parameters()))
    assert not np.array_equal(m1.w_dec.detach().numpy(), m3.w_dec.detach().numpy())


# --- the SAE generator on synthetic runs ----------------------------------------------------------------------------
def _b_fails_on_quickdraw(root):
    """A right on 60% (shared difficulty); B the same except wrong on every quickdraw image A gets right."""
    ts = syn.make_test_set(DOMAINS, CLASSES, 30)
    ca = np.random.default_rng(7).random(len(ts["labels"])) < 0.6
    cb = ca.copy()
    cb[(ts["domains"] == "quickdraw") & ca] = False
    counts = syn.counts_matrix(DOMAINS, CLASSES, absent={("sketch", c) for c in HELDOUT})
    for name, corr, seed in (("A", ca, 1), ("B", cb, 2)):
        syn.write_run(root, name, syn.outputs(ts, corr, len(CLASSES), seed), CLASSES, HELDOUT, "sketch", counts,
                      seed=seed, recipe_id="cfg")


def test_sae_generator_finds_a_planted_domain_failure(tmp_path):
    from clipgen.diff.generators import sae
    from clipgen.diff.predicates import BehaviourParams, Codes
    from clipgen.diff.records import build_records, load_run
    from clipgen.diff.run import diff_runs
    from clipgen.diff.split import split_mask

    _b_fails_on_quickdraw(tmp_path)
    res = diff_runs(make_cfg(tmp_path, "logger=none", "run_a=A", "run_b=B", "diff.generators=[sae]"))
    with open(f"{res['diff_dir']}/hypotheses.jsonl") as f:
        hyps = [json.loads(line) for line in f]
    qd = [h for h in hyps if h["slice"] == {"domain": "quickdraw"} and h["direction"] == "A" and h["accepted"]]
    assert qd, [h["text"] for h in hyps]
    lat = qd[0]["latent"]
    assert lat["enrichment"]["domain"][0][0] == "quickdraw" and lat["active_when_a_wins"] > lat["active_when_b_wins"]
    assert lat["verification"]["accepted"] and 0 <= lat["decoder_share_b"] <= 1
    assert res["generators"]["sae"]["dictionary"]["fvu"] < 0.5
    summary = (tmp_path / "diffs" / "A__vs__B" / "summary.md").read_text()
    assert f"SAE latent {lat['index']}: fires on" in summary
    # deterministic: the generator run again on the same records gives the same hypotheses
    recs, _ = build_records(load_run(tmp_path / "runs" / "A"), load_run(tmp_path / "runs" / "B"), 2)
    codes = Codes(recs)
    verify = split_mask(recs.sample_ids, recs.domain.astype(np.int64) * len(CLASSES) + recs.label, 0)
    runs = [sae.generate(codes, verify, BehaviourParams()) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


def test_sae_says_nothing_when_the_runs_agree(tmp_path):
    from clipgen.diff.generators import sae
    from clipgen.diff.predicates import BehaviourParams, Codes
    from clipgen.diff.records import build_records, load_run

    _b_fails_on_quickdraw(tmp_path)
    a = load_run(tmp_path / "runs" / "A")
    recs, _ = build_records(a, a, 2)
    assert sae.generate(Codes(recs), np.zeros(recs.n, bool), BehaviourParams()) == []


def test_concept_names_pick_the_nearest_word():
    """A latent whose decoder direction in run A's space is a word's text embedding is named by that word."""
    from clipgen.diff.crosscoder import Crosscoder, fit_standardiser
    from clipgen.diff.generators.sae import concept_names

    rng = np.random.default_rng(0)
    emb = [rng.normal(size=(200, 8)), rng.normal(size=(200, 8))]
    std = fit_standardiser(emb, 8)
    model = Crosscoder((8, 8), 4, seed=0)
    words = ["sketch", "photo", "axe"]
    txt = rng.normal(size=(3, 8))
    import torch

    with torch.no_grad():  # latent 2's directions: 'axe' in A's embedding space, 'photo' in B's
        model.w_dec[2, :8] = torch.as_tensor(txt[2] @ std.bases[0], dtype=torch.float32)
        model.w_dec[2, 8:] = torch.as_tensor(txt[1] @ std.bases[1], dtype=torch.float32)
    names = concept_names(std, model, [2], {"words": words, "a": txt, "b": txt})
    assert names[2]["a"]["concept"] == "axe" and names[2]["a"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert names[2]["b"]["concept"] == "photo"


# --- the comparison's statistics -------------------------------------------------------------------------------------
def _row(kind, contrast, seed, **gens):
    return {"kind": kind, "contrast": contrast, "seed": seed,
            "generators": {g: {"accepted": v[0], "acceptance_rate": v[1], "interestingness": v[2]}
                           for g, v in gens.items()}}


ROWS = [_row("contrast", "x vs y", 0, slice_diff=(4, 1.0, 3.0), sae=(2, 0.5, None)),
        _row("contrast", "x vs y", 1, slice_diff=(6, 0.8, 4.0), sae=(3, 1.0, 3.0)),
        _row("contrast", "x vs y", 2, slice_diff=(5, 0.9, 2.0), sae=(1, 0.25, 2.0)),
        _row("contrast", "y vs z", 0, slice_diff=(1, 1.0, 5.0), sae=(0, 0.0, None)),
        _row("contrast", "y vs z", 1, slice_diff=(2, 1.0, 4.0), sae=(2, 1.0, 4.0)),
        _row("contrast", "y vs z", 2, slice_diff=(3, 1.0, 3.0), sae=(4, 1.0, 5.0)),
        _row("null", "x seed null", "0-1", slice_diff=(2, 1.0, 3.0), sae=(0, 0.0, None)),
        _row("null", "y seed null", "0-1", slice_diff=(0, 0.0, None), sae=(0, 0.0, None))]


def test_generator_tables_by_hand():
    t = C.generator_tables(ROWS, ["slice_diff", "sae"], ["x vs y", "y vs z"])
    sd = {r["contrast"]: r for r in t["slice_diff"]}
    assert sd["x vs y"]["n_pairs"] == 3 and sd["x vs y"]["accepted"] == t_interval([4, 6, 5], 0, math.inf)
    assert sd["x vs y"]["acceptance_rate"] == t_interval([1.0, 0.8, 0.9], 0, 1)
    # all contrasts: per seed the mean over the contrasts, then the interval over seeds
    assert sd[C.ALL]["accepted"]["mean"] == pytest.approx(np.mean([2.5, 4.0, 4.0]))
    assert sd[C.ALL]["n_pairs"] == 3
    sae = {r["contrast"]: r for r in t["sae"]}
    assert sae["x vs y"]["interestingness"]["n"] == 2  # undefined (nothing accepted) is left out
    # seed 0 has none in either contrast (left out); seeds 1 and 2: (3 + 4) / 2 and (2 + 5) / 2
    assert sae[C.ALL]["interestingness"]["mean"] == pytest.approx(3.5) and sae[C.ALL]["interestingness"]["n"] == 2
    null = sd["seed-null pairs"]
    assert null["n_pairs"] == 2 and null["with_accepted"] == 1 and null["accepted"]["mean"] == 1.0
    assert sae["seed-null pairs"]["with_accepted"] == 0


def test_paired_differences_between_generators_by_hand():
    p = C.paired_tables(ROWS, ["slice_diff", "sae"], ["x vs y", "y vs z"])
    assert {(r["a"], r["b"], r["contrast"]) for r in p} == {("slice_diff", "sae", c)
                                                             for c in ("x vs y", "y vs z", C.ALL)}
    xy = next(r for r in p if r["contrast"] == "x vs y")
    assert xy["accepted"]["mean"] == pytest.approx(3.0) and xy["accepted"]["n_higher"] == 3
    assert xy["interestingness"]["n"] == 2  # seed 0 has no SAE interestingness
    al = next(r for r in p if r["contrast"] == C.ALL)
    assert al["accepted"]["mean"] == pytest.approx(np.mean([(2 + 1) / 2, (3 + 0) / 2, (4 - 1) / 2]))
    assert al["accepted"]["n_higher"] == 3 and al["accepted"]["n_lower"] == 0
    text = C.markdown({"study": "s", "intro": "i", "generators": ["slice_diff", "sae"], "paired": p,
                       "tables": C.generator_tables(ROWS, ["slice_diff", "sae"], ["x vs y", "y vs z"]),
                       "recall": None})
    assert "slice_diff − sae" in text and "3:0" in text and "## sae" in text


def test_designed_difference_match_rule():
    cells = {("sketch", c) for c in HELDOUT}
    h = {"direction": "B", "behaviour": "correct", "cells": [["sketch", c] for c in HELDOUT]}
    assert C.designed_match(h, cells, 0.5)
    assert not C.designed_match({**h, "direction": "A"}, cells, 0.5)
    assert not C.designed_match({**h, "behaviour": "confident_error"}, cells, 0.5)
    wide = {**h, "cells": [["sketch", c] for c in CLASSES]}  # all of sketch: Jaccard 3/10
    assert not C.designed_match(wide, cells, 0.5) and C.designed_match(wide, cells, 0.3)
    assert not C.designed_match({**h, "cells": None}, cells, 0.5)  # a slice too broad to list its cells


def test_comparison_bad_input(tmp_path):
    from clipgen.diff.run import run_diff

    with pytest.raises(ClipgenError, match=r"diff.contrasts entry \['cg_low'\]"):
        run_diff(make_cfg(tmp_path, "diff.contrasts=[[cg_low]]"))
    with pytest.raises(ClipgenError, match="diff.recall_contrast"):
        run_diff(make_cfg(tmp_path, "diff.contrasts=[[cg_low,cg_high]]", "diff.recall_contrast=[lod,cg_high]"))
    with pytest.raises(ClipgenError, match="diff.contrasts entry 'cg_hihg': unknown study.recipes entry"):
        run_diff(make_cfg(tmp_path, "diff.contrasts=[[cg_low,cg_hihg]]"))
    with pytest.raises(ClipgenError, match="have no evaluation outputs"):
        run_diff(make_cfg(tmp_path, "diff.contrasts=[[cg_low,cg_high]]"))
    with pytest.raises(ClipgenError, match="diff.sae_steps=0"):
        run_diff(make_cfg(tmp_path, "diff.contrasts=[[cg_low,cg_high]]", "diff.sae_steps=0"))
    _b_fails_on_quickdraw(tmp_path)
    with pytest.raises(ClipgenError, match="diff.sae_vocab_file='nope.txt' does not exist"):
        run_diff(make_cfg(tmp_path, "logger=none", "run_a=A", "run_b=B", "diff.sae_vocab_file=nope.txt"))


# --- a tiny trained study, compared end to end -------------------------------------------------------------------
STUDY = ("debug=smoke", "world=diff_small", "trainer.epochs=1", "study.name=cmp",
         "study.recipes=[cg_low,cg_low_pseudo]", "study.seeds=[0,1]")
COMPARE = ("logger=none", "diff.contrasts=[[cg_low,cg_low_pseudo]]", "diff.recall_contrast=[cg_low,cg_low_pseudo]")


@pytest.fixture(scope="module")
def study(tmp_path_factory, one_torch_thread):
    """CG-low and its pseudo upper bound, seeds 0 and 1, one epoch each on the diff_small world (4 runs, two
    one-thread processes). These tests check how runs are paired, compared and recorded, not what they learned:
    that is test_diff.py's real pair, trained for 16 epochs."""
    from clipgen.launch.study import run_study

    with scratch_dir(tmp_path_factory, "diff_compare") as root:
        run_study(make_cfg(root, *STUDY, "study.parallel=2"))
        yield root


@pytest.mark.slow
def test_comparison_of_a_trained_study_end_to_end(study, capsys):
    from clipgen.diff.report import report_section
    from clipgen.diff.run import run_diff

    cfg = make_cfg(study, *STUDY, *COMPARE)
    res = run_diff(cfg)
    assert not res["skipped"] and res["computed_pairs"] == 4
    kinds = sorted((r["kind"], str(r["seed"])) for r in res["pairs"])
    assert kinds == [("contrast", "0"), ("contrast", "1"), ("null", "0-1"), ("null", "0-1")]
    out = study / "diffs" / "compare--cmp"
    assert {p.name for p in out.iterdir()} == {"comparison.json", "comparison.md", "pairs.csv"}
    for g in ("slice_diff", "cluster", "sae"):
        rows = {r["contrast"]: r for r in res["tables"][g]}
        assert rows["cg_low vs cg_low_pseudo"]["n_pairs"] == 2 and rows["seed-null pairs"]["n_pairs"] == 2
        # the table's mean is the mean of the pairs' own diff.json numbers
        own = [json.loads((study / "diffs" / f"{r['run_a']}__vs__{r['run_b']}" / "diff.json").read_text())
               ["generators"][g]["accepted"] for r in res["pairs"] if r["kind"] == "contrast"]
        assert rows["cg_low vs cg_low_pseudo"]["accepted"]["mean"] == pytest.approx(np.mean(own))
        assert res["recall"]["generators"][g]["seeds"] == 2
    assert len((out / "pairs.csv").read_text().splitlines()) == 1 + 4 * 3
    assert "## sae" in (out / "comparison.md").read_text()

    # a rerun diffs nothing; a lost pair is the only one diffed again, to the same result (every choice is seeded)
    capsys.readouterr()
    again = run_diff(cfg)
    assert again["skipped"] and again["computed_pairs"] == 0
    assert capsys.readouterr().out.count("up to date") == 5  # four pairs and the comparison
    lost = study / "diffs" / f"{res['pairs'][1]['run_a']}__vs__{res['pairs'][1]['run_b']}" / "diff.json"
    before = json.loads(lost.read_text())
    lost.unlink()
    again = run_diff(cfg)
    assert again["computed_pairs"] == 1 and again["skipped"]  # the same key: the comparison itself is current
    after = json.loads(lost.read_text())
    timings = ("seconds", "cpu_seconds")
    for g, m in before["generators"].items():
        assert {k: v for k, v in m.items() if k not in timings} == \
            {k: v for k, v in after["generators"][g].items() if k not in timings}

    html = report_section(study, study / "report")
    assert "Methods comparison: cmp" in html and html.count("<details>") == 4


@pytest.mark.slow
def test_latents_named_from_a_vocabulary(study, tmp_path):
    """diff.sae_vocab_file embeds the words with each run's own text tower at the diffed epoch."""
    from clipgen.diff.concepts import vocabulary
    from clipgen.diff.records import load_run
    from clipgen.recipes.grid import Job, job_config, run_dir_of

    cfg = make_cfg(study, *STUDY)
    runs = [load_run(run_dir_of(job_config(cfg, Job("sketch", r, 0)))) for r in ("cg_low", "cg_low_pseudo")]
    (tmp_path / "v.txt").write_text("# concepts\nsketch\nphoto\n\nsketch\naxe\n")
    v = vocabulary(tmp_path / "v.txt", runs[0], runs[1], 1, "paper86")  # the last epoch, which the diff reads
    assert v["words"] == ["sketch", "photo", "axe"] and v["a"].shape[0] == 3 and v["b"].shape == v["a"].shape
    assert np.allclose(np.linalg.norm(v["a"], axis=1), 1.0, atol=1e-5) and not np.allclose(v["a"], v["b"])
