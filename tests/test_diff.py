"""clipgen-diff (protocol §8): metrics against hand counts, the verifier, the split, planted differences, controls,
rerun skipping, the report section, and a diff of two real trained runs."""
from __future__ import annotations

import json
import shutil
from html import unescape
from urllib.parse import unquote

import numpy as np
import pytest

from conftest import make_cfg, run_name_of, scratch_dir
from clipgen.diff import metrics as M
from clipgen.diff import synthetic as syn
from clipgen.diff.split import split_mask

DOMAINS = ["clipart", "quickdraw", "real", "sketch"]
CLASSES = ["aircraft carrier", "axe", "banana", "barn", "bed", "bicycle", "dolphin", "duck", "horse", "pants"]
HELDOUT = ["aircraft carrier", "axe", "banana"]
ABSENT = {("sketch", c) for c in HELDOUT}  # C2 removed from the test domain in both recipes


# --- metric functions against hand counts -------------------------------------------------------------------
def test_metrics_hand_counts():
    m = M.split_metrics(n_a=3, n_b=7, n_slice=20, n_total=100, direction="B", alpha=0.01)
    assert m["frequency"] == pytest.approx(10 / 100)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["margin"] == pytest.approx((7 - 3) / 20)
    assert m["accepted"]
    m = M.split_metrics(n_a=3, n_b=7, n_slice=20, n_total=100, direction="A", alpha=0.01)
    assert m["accuracy"] == pytest.approx(3 / 10) and m["margin"] == pytest.approx(-0.2) and not m["accepted"]
    assert np.isnan(M.accuracy(0, 0, "B")) and M.frequency(0, 0, 50) == 0.0
    assert M.acceptance_rate([True, False, False, True]) == 0.5


def test_alpha_margin_rule():
    # share of B (11/100) exceeds share of A (10/100) by exactly alpha: not more, so rejected
    assert not M.accepted(10, 11, 100, "B", 0.01)
    assert M.accepted(10, 12, 100, "B", 0.01)
    assert not M.accepted(10, 12, 100, "B", 0.02)
    assert not M.accepted(12, 10, 100, "B", 0.0)  # wrong direction
    assert M.accepted(12, 10, 100, "A", 0.01)
    assert not M.accepted(0, 0, 0, "B", 0.0)  # an empty slice is never accepted


def test_mcnemar_and_bh_hand_values():
    # exact two-sided McNemar: 0 vs 5 discordant -> 2 * 0.5**5
    assert M.mcnemar_exact(0, 5) == pytest.approx(2 * 0.5 ** 5)
    assert M.mcnemar_exact(3, 3) == pytest.approx(1.0)
    # 1 vs 9: 2 * (1 + 10) / 1024
    assert M.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    q = M.benjamini_hochberg([0.01, 0.04, 0.03, 0.5])
    assert q == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert M.mcnemar_z(4, 13) == pytest.approx(9 / np.sqrt(17))


def test_split_is_stratified_and_stable():
    ts = syn.make_test_set(DOMAINS, CLASSES, 9)
    strata = np.unique(ts["domains"], return_inverse=True)[1] * len(CLASSES) + ts["labels"]
    v = split_mask(ts["sample_ids"], strata, seed=0)
    assert v.sum() == len(v) // 3
    for s in np.unique(strata):
        assert v[strata == s].sum() == 3  # 9 images per cell -> 3 for verification
    perm = np.random.default_rng(0).permutation(len(v))
    assert np.array_equal(split_mask(ts["sample_ids"][perm], strata[perm], seed=0), v[perm])  # order-free
    assert not np.array_equal(split_mask(ts["sample_ids"], strata, seed=1), v)


# --- synthetic pairs ----------------------------------------------------------------------------------------
def _difficulty(ts, seed=7):
    return np.random.default_rng(seed).random(len(ts["labels"]))


def _correct(ts, base_acc, seed, sigma):
    """A run's correctness: shared per-image difficulty plus run-specific noise (seed-like variation)."""
    u = _difficulty(ts) + np.random.default_rng(seed).normal(0, sigma, len(ts["labels"]))
    return u < base_acc


def _write(root, name, ts, correct, seed, rid="cfg"):
    return syn.write_run(root, name, syn.outputs(ts, correct, len(CLASSES), seed), CLASSES, HELDOUT, "sketch",
                         syn.counts_matrix(DOMAINS, CLASSES, absent=ABSENT), seed=seed, recipe_id=rid)


def _b_fails_on(root, domain: str, run_a: str = "A") -> None:
    """Runs ``run_a`` and B on 30 images per cell: A right on 60%, B the same except wrong on every image of
    ``domain`` that A gets right."""
    ts = syn.make_test_set(DOMAINS, CLASSES, 30)
    ca = _correct(ts, 0.6, 1, 0.03)
    cb = ca.copy()
    cb[(ts["domains"] == domain) & ca] = False
    _write(root, run_a, ts, ca, 1)
    _write(root, "B", ts, cb, 2)


def _diff(root, a, b, *extra):
    from clipgen.diff.run import run_diff

    return run_diff(make_cfg(root, "logger=none", f"run_a='{a}'", f"run_b='{b}'", *extra))


def _hyps(res):
    with open(f"{res['diff_dir']}/hypotheses.jsonl") as f:
        return [json.loads(line) for line in f]


def test_identical_copy_yields_nothing_and_rerun_skips(tmp_path, capsys):
    ts = syn.make_test_set(DOMAINS, CLASSES, 30)
    a = _write(tmp_path, "A", ts, _correct(ts, 0.6, 1, 0.1), 1)
    b = tmp_path / "runs" / "A_copy"
    shutil.copytree(a, b)
    json_path = b / "meta.json"
    meta = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**meta, "run_name": "A_copy"}))
    res = _diff(tmp_path, "A", "A_copy")
    assert all(m["accepted"] == 0 for m in res["generators"].values())
    assert not any(h["accepted"] for h in _hyps(res))
    assert res["top"] == []
    summary = (tmp_path / "diffs" / "A__vs__A_copy" / "summary.md").read_text()
    assert "No hypothesis was accepted on the verification split." in summary
    mtime = (tmp_path / "diffs" / "A__vs__A_copy" / "summary.md").stat().st_mtime_ns
    again = _diff(tmp_path, "A", "A_copy")
    assert again["skipped"] and (tmp_path / "diffs" / "A__vs__A_copy" / "summary.md").stat().st_mtime_ns == mtime
    assert "nothing to do" in capsys.readouterr().out
    # a changed diff config is a different key: recomputed
    assert not _diff(tmp_path, "A", "A_copy", "diff.alpha=0.02")["skipped"]


def test_planted_domain_failure_is_top_hypothesis(tmp_path):
    """B is wrong on 30% of quickdraw images (and seed-like noise elsewhere)."""
    ts = syn.make_test_set(DOMAINS, CLASSES, 40)
    ca = _correct(ts, 0.7, 1, 0.03)
    cb = _correct(ts, 0.7, 2, 0.03)
    qd = np.flatnonzero(ts["domains"] == "quickdraw")
    broken = np.random.default_rng(3).choice(qd, size=int(0.3 * len(qd)), replace=False)
    cb[broken] = False
    _write(tmp_path, "A", ts, ca, 1)
    _write(tmp_path, "B", ts, cb, 2)
    res = _diff(tmp_path, "A", "B")
    top = res["top"][:3]
    hit = [h for h in top if h["slice"] == {"domain": "quickdraw"} and h["direction"] == "A"
           and h["behaviour"] in ("correct", "true_prob")]
    assert hit, f"planted quickdraw failure not among the top hypotheses: {[h['text'] for h in top]}"
    assert hit[0]["verification_accuracy"] > 0.9
    full = [h for h in _hyps(res) if h["slice"] == {"domain": "quickdraw"} and h["behaviour"] == "correct"]
    assert full and full[0]["accepted"] and full[0]["verification"]["accuracy"] > 0.9
    assert "On quickdraw images" in hit[0]["text"] and "run A" in hit[0]["text"]
    assert full[0]["evidence"] and all(e.startswith("quickdraw/") for e in full[0]["evidence"])
    scores = full[0]["interestingness"], full[0]["abstraction"]
    assert all(1 <= s["score"] <= 5 for s in scores)


def test_planted_heldout_cell_improvement_is_found(tmp_path):
    """B is much better on one held-out class x domain cell (sketch x axe, unseen by both recipes)."""
    ts = syn.make_test_set(DOMAINS, CLASSES, 40)
    ca = _correct(ts, 0.6, 1, 0.03)
    cb = _correct(ts, 0.6, 2, 0.03)
    cell = (ts["domains"] == "sketch") & (ts["labels"] == CLASSES.index("axe"))
    ca[cell] = _difficulty(ts)[cell] < 0.1
    cb[cell] = _difficulty(ts)[cell] < 0.95
    _write(tmp_path, "A", ts, ca, 1)
    _write(tmp_path, "B", ts, cb, 2)
    res = _diff(tmp_path, "A", "B")
    top = res["top"][:3]
    hit = [h for h in top if h["slice"] == {"domain": "sketch", "class": "axe"} and h["direction"] == "B"]
    assert hit, f"planted cell not among the top hypotheses: {[h['text'] for h in top]}"
    assert hit[0]["verification_accuracy"] > 0.9
    assert "sketch images of axe" in hit[0]["text"] and "neither run saw" in hit[0]["text"]


def test_seed_noise_is_like_the_null_control(tmp_path):
    """Two seeds of one configuration vs a third: A-vs-B accepts about as much as A-vs-null (the FDR baseline)."""
    ts = syn.make_test_set(DOMAINS, CLASSES, 30)
    for i, name in enumerate(("A", "B", "N"), 1):
        _write(tmp_path, name, ts, _correct(ts, 0.6, i, 0.2), i)
    res = _diff(tmp_path, "A", "B", "null_run=N")
    acc_ab = sum(m["accepted"] for m in res["generators"].values())
    acc_null = sum(m["accepted"] for m in res["null"]["generators"].values())
    assert res["null"]["run"] == "N"
    assert abs(acc_ab - acc_null) <= 3, (acc_ab, acc_null)
    assert acc_ab <= 5  # noise: few if any accepted slice-diff/cluster hypotheses
    metrics = json.loads((tmp_path / "diffs" / "A__vs__B" / "metrics.json").read_text())
    assert metrics["null"]["generators"].keys() == metrics["generators"].keys()
    # the seed noise column is filled from A's other seeds (B and N share A's recipe id)
    assert all(r["seed_std"] is not None for r in metrics["domain_accuracy"])
    summary = (tmp_path / "diffs" / "A__vs__B" / "summary.md").read_text()
    assert "Seed-null control" in summary


def test_outputs_and_report_section(tmp_path):
    from clipgen.diff.report import report_section

    assert report_section(tmp_path, tmp_path / "report") == ""
    _b_fails_on(tmp_path, "clipart", run_a="A<x>")
    res = _diff(tmp_path, "A<x>", "B")
    out = tmp_path / "diffs" / "A<x>__vs__B"
    for f in ("summary.md", "hypotheses.jsonl", "metrics.json", "accuracy_vs_frequency.png", "delta_accuracy.png",
              "diff.json"):
        assert (out / f).is_file(), f
    summary = (out / "summary.md").read_text()
    for part in ("## Training mixtures", "## Accuracy per domain", "## Generators", "## Top hypotheses"):
        assert part in summary
    assert res["top"] and "On clipart images" in summary
    html = report_section(tmp_path, tmp_path / "report")
    assert html.startswith("<h2>") and "A&lt;x&gt;" in html and "A<x>" not in html
    assert (tmp_path / "report" / "diffs").is_dir()
    srcs = [unquote(unescape(p.split('"')[0])) for p in html.split('src="')[1:]]
    assert len(srcs) == 2
    for src in srcs:
        assert not src.startswith("/") and (tmp_path / "report" / src).is_file()


def test_bad_input_is_one_clear_line(tmp_path):
    from clipgen.errors import ClipgenError

    with pytest.raises(ClipgenError, match="run_a is not set"):
        _diff(tmp_path, "", "B")
    ts = syn.make_test_set(DOMAINS, CLASSES, 3)
    _write(tmp_path, "A", ts, np.ones(len(ts["labels"]), bool), 1)
    with pytest.raises(ClipgenError, match="run_b='nope'"):
        _diff(tmp_path, "A", "nope")
    with pytest.raises(ClipgenError, match="diff.generators"):
        _diff(tmp_path, "A", "A", "diff.generators=[magic]")


def test_wandb_table_offline(tmp_path):
    from wandb_records import read_offline_run

    from clipgen.diff.run import run_diff

    _b_fails_on(tmp_path, "real")
    res = run_diff(make_cfg(tmp_path, "logger=wandb", "logger.mode=offline", "run_a=A", "run_b=B"))
    rec = read_offline_run(res["diff_dir"])
    assert len(rec["run_ids"]) >= 1
    rows = [h for h in rec["history"] if "diff/hypotheses/nrows" in h]
    assert rows and rows[0]["diff/hypotheses/nrows"] == len(_hyps(res)) > 0
    assert rows[0]["diff/hypotheses/_type"] == "table-file"


def test_llm_backend_is_optional_local_only_and_reports_agreement(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from clipgen.diff.llm import LLM, parse_rating
    from clipgen.errors import ClipgenError

    with pytest.raises(ClipgenError, match="localhost"):
        LLM("openai", endpoint="https://api.example.com/v1")
    assert parse_rating('Sure: {"interestingness": 4, "abstraction": 2}') == {"interestingness": 4, "abstraction": 2}
    assert parse_rating("interestingness: 9") is None

    prompts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # a stand-in OpenAI-compatible server: rates everything 3 / 4
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            prompts.append(prompt)
            reply = '{"interestingness": 3, "abstraction": 4}' if "Rate on 1-5" in prompt else "Paraphrased."
            data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _b_fails_on(tmp_path, "sketch")
        res = _diff(tmp_path, "A", "B", "diff.llm_backend=openai",
                    f"diff.llm_endpoint=http://127.0.0.1:{server.server_port}/v1", "diff.llm_max_hypotheses=3")
    finally:
        server.shutdown()
    hyps = _hyps(res)
    rated = [h for h in hyps if h.get("llm_rating")]
    assert len(rated) == 3 and all(h["paraphrase"] == "Paraphrased." for h in rated)
    assert len(prompts) == 6  # one paraphrase + one rating per hypothesis
    metrics = json.loads((tmp_path / "diffs" / "A__vs__B" / "metrics.json").read_text())
    agree = metrics["llm_agreement"]["interestingness"]
    want = np.mean([h["interestingness"]["score"] == 3 for h in rated])
    assert agree["n"] == 3 and agree["exact"] == pytest.approx(want)
    assert "LLM autorater vs rule-based scores" in (tmp_path / "diffs" / "A__vs__B" / "summary.md").read_text()


def test_seed_consistency_over_other_seed_pairs(tmp_path):
    """Configurations A and B with two seeds each: the planted difference holds on the other seed pair too."""
    ts = syn.make_test_set(DOMAINS, CLASSES, 30)
    qd = np.flatnonzero(ts["domains"] == "quickdraw")
    for seed in (0, 1):
        ca = _correct(ts, 0.7, 10 + seed, 0.03)
        cb = _correct(ts, 0.7, 20 + seed, 0.03)
        cb[np.random.default_rng(seed).choice(qd, size=len(qd) // 2, replace=False)] = False
        _write(tmp_path, f"A-s{seed}", ts, ca, seed, rid="cfg-a")
        _write(tmp_path, f"B-s{seed}", ts, cb, seed, rid="cfg-b")
    res = _diff(tmp_path, "A-s0", "B-s0")
    hyps = _hyps(res)
    qd_h = [h for h in hyps if h["slice"] == {"domain": "quickdraw"} and h["behaviour"] == "correct"]
    assert qd_h and qd_h[0]["seed_consistency"] == 1.0
    assert json.loads((tmp_path / "diffs" / "A-s0__vs__B-s0" / "metrics.json").read_text())["seed_pairs"] == 1
    assert "seed consistency 1.00" in (tmp_path / "diffs" / "A-s0__vs__B-s0" / "summary.md").read_text()


def test_without_manifests_exposure_slices_are_left_out(tmp_path):
    _b_fails_on(tmp_path, "sketch")
    shutil.rmtree(tmp_path / "recipes")
    res = _diff(tmp_path, "A", "B")
    hyps = _hyps(res)
    assert res["top"] and res["top"][0]["slice"] == {"domain": "sketch"}
    assert not any({"combo", "domain_seen"} & set(h["slice"]) for h in hyps)
    assert not any(h["behaviour"] == "shortcut_error" for h in hyps)


# --- the seed-null control, the verification headline, near-duplicates -----------------------------------------
HELDOUT_SKETCH = [CLASSES.index(c) for c in HELDOUT]


def _b_learns_heldout(root, null_too: bool | None = None) -> None:
    """A (recipe without the held-out classes in sketch) and B (recipe with them) are alike except on those
    cells, where A is right on 10% and B on 95%. ``null_too``: write a null run N with A's recipe and seed-like
    noise that is (True) as good as B on those same cells or (False) as poor as A there."""
    ts = syn.make_test_set(DOMAINS, CLASSES, 30)
    cell = (ts["domains"] == "sketch") & np.isin(ts["labels"], HELDOUT_SKETCH)
    hard = _difficulty(ts)
    runs = {"A": (1, 0.1, ABSENT, "cfg-a"), "B": (2, 0.95, set(), "cfg-b")}
    if null_too is not None:
        runs["N"] = (3, 0.95 if null_too else 0.1, ABSENT, "cfg-a")
    for name, (seed, acc, absent, rid) in runs.items():
        c = _correct(ts, 0.6, seed, 0.03)
        c[cell] = hard[cell] < acc
        syn.write_run(root, name, syn.outputs(ts, c, len(CLASSES), seed), CLASSES, HELDOUT, "sketch",
                      syn.counts_matrix(DOMAINS, CLASSES, absent=absent), seed=seed, recipe_id=rid)


B_ONLY = {"combo": "b_only"}  # the held-out classes in sketch: the only combinations B saw and A did not


@pytest.mark.parametrize("null_too", [True, False])
def test_null_judges_each_hypothesis_on_its_own_images(tmp_path, null_too):
    """The "only B saw it" slice is empty between A and N (same recipe): the null must still be judged on the
    slice's images from A vs B, so a null that differs there as much as B does is caught."""
    _b_learns_heldout(tmp_path, null_too=null_too)
    res = _diff(tmp_path, "A", "B", "null_run=N")
    top = res["top"][0]
    assert top["slice"] == B_ONLY and top["direction"] == "B" and top["behaviour"] == "correct", top["text"]
    n = top["null"]
    assert n["run"] == "N"
    # the same verification images: 10 per held-out cell x 3 cells
    assert n["verification"]["n_slice"] == 30 and n["verification"]["n"] == res["n_images"] // 3
    metrics = json.loads((tmp_path / "diffs" / "A__vs__B" / "metrics.json").read_text())
    summary = (tmp_path / "diffs" / "A__vs__B" / "summary.md").read_text()
    null = metrics["null"]
    assert null["split"] == "verification" and null["checked"] >= 1
    if null_too:
        assert n["accepted"] and n["verification"]["margin"] > 0.5 and not n["exceeds"]
        assert top["verification_margin"] - n["verification"]["margin"] < 0.2
        assert null["same_difference"] >= 1 and null["exceeds_null"] < null["checked"]
    else:
        assert not n["accepted"] and abs(n["verification"]["margin"]) < 0.1 and n["exceeds"]
        assert null["same_difference"] == 0 and null["exceeds_null"] == null["checked"]
    sentence = (f"{null['same_difference']} of {null['checked']} accepted hypotheses also hold between A and the "
                f"null run, {null['exceeds_null']} of {null['checked']} differ between A and B by significantly "
                "more than between the two seeds")
    assert sentence in summary


def test_acceptance_is_decided_on_the_verification_split(tmp_path):
    """B fails on quickdraw only on discovery images: generated and 'accepted' there, rejected on verification."""
    from clipgen.diff.records import build_records, load_run

    ts = syn.make_test_set(DOMAINS, CLASSES, 30)
    ca = _correct(ts, 0.7, 1, 0.03)
    a = _write(tmp_path, "A", ts, ca, 1)
    recs, _ = build_records(load_run(a), load_run(a), 2)
    verify = split_mask(recs.sample_ids, recs.domain.astype(np.int64) * len(CLASSES) + recs.label, 0)
    in_verify = np.isin(ts["sample_ids"], recs.sample_ids[verify])
    cb = ca.copy()
    cb[(ts["domains"] == "quickdraw") & ~in_verify & ca] = False
    # B's outputs drawn with A's seed: identical logits wherever the correctness is the same
    syn.write_run(tmp_path, "B", syn.outputs(ts, cb, len(CLASSES), 1), CLASSES, HELDOUT, "sketch",
                  syn.counts_matrix(DOMAINS, CLASSES, absent=ABSENT), seed=2, recipe_id="cfg")
    res = _diff(tmp_path, "A", "B")
    assert res["top"] == []  # the only difference is confined to discovery images
    qd = [h for h in _hyps(res) if h["slice"] == {"domain": "quickdraw"} and h["behaviour"] == "correct"]
    assert qd and qd[0]["direction"] == "A"
    assert qd[0]["discovery"]["accepted"] and qd[0]["discovery"]["margin"] > 0.5
    assert not qd[0]["accepted"] and qd[0]["verification"]["margin"] == 0.0
    g = res["generators"]["slice_diff"]
    assert g["discovery_acceptance_rate"] == 1.0 and g["accepted"] == 0 and g["acceptance_rate"] == 0.0
    summary = (tmp_path / "diffs" / "A__vs__B" / "summary.md").read_text()
    assert "acceptance rate (verification)" in summary and "acceptance rate (discovery, where generated)" in summary


def test_near_duplicate_hypotheses_are_merged(tmp_path):
    """B's gain on the held-out classes in sketch is one finding: its per-cell restatements and the cluster
    generator's copies are merged into the "only B saw it" hypothesis."""
    _b_learns_heldout(tmp_path)
    res = _diff(tmp_path, "A", "B")
    hyps = {h["id"]: h for h in _hyps(res)}
    distinct = [h for h in hyps.values() if h["duplicate_of"] is None and h["same_as"] is None]
    gain = [h for h in distinct if h["behaviour"] == "correct" and h["direction"] == "B"]
    assert len(gain) == 1 and gain[0]["slice"] == B_ONLY and gain[0]["accepted"], [h["text"] for h in gain]
    cells = [h for h in hyps.values() if h["behaviour"] == "correct" and h["direction"] == "B"
             and set(h["slice"]) == {"domain", "class"}]
    assert cells and all(h["duplicate_of"] == gain[0]["id"] or h["same_as"] == gain[0]["id"] for h in cells)
    assert set(gain[0]["merged"]) == {h["id"] for h in cells if h["generator"] == "slice_diff"}
    copies = [h for h in hyps.values() if h["generator"] == "cluster" and h["same_as"] is not None]
    assert copies and all(hyps[h["same_as"]]["generator"] == "slice_diff" for h in copies)
    assert "cluster" in gain[0]["also_found_by"]
    # top rows never restate each other: no two with the same behaviour and direction on nested image sets
    assert len({(h["behaviour"], h["target"], h["direction"], str(h["slice"])) for h in res["top"]}) == len(res["top"])
    m = res["generators"]["slice_diff"]
    assert m["merged"] == sum(h["duplicate_of"] is not None for h in hyps.values() if h["generator"] == "slice_diff")
    assert "near-duplicates merged" in (tmp_path / "diffs" / "A__vs__B" / "summary.md").read_text()


def test_nested_relation_rules():
    """Hand-made verdicts (+1 B, -1 A, 0 alike) on 200 discovery images: when does a smaller slice restate a
    larger one?"""
    from clipgen.diff.dedup import relation

    big = np.zeros(200, bool)
    big[:100] = True
    small = np.zeros(200, bool)
    small[:40] = True
    disc = np.ones(200, bool)
    v = np.zeros(200, np.int8)
    v[:36] = 1  # B better on 36 of the small slice's 40 images, nothing elsewhere
    assert relation(small, big, v, disc, "B", 0.05) == "small_explains"
    assert relation(small, small.copy(), v, disc, "B", 0.05) == "same"
    assert relation(big, small, v, disc, "B", 0.05) is None  # not nested that way round
    v[40:94] = 1  # the same rate over the whole large slice: the small one only inherits it
    v[94:100] = 0
    v[36:40] = 1
    v[:4] = 0
    assert relation(small, big, v, disc, "B", 0.05) == "small_inherits"
    v[:40] = 1  # all of the small slice, about half the rest: two findings
    v[40:100] = 0
    v[40:70] = 1
    assert relation(small, big, v, disc, "B", 0.05) is None


# --- two real trained runs ------------------------------------------------------------------------------------
REAL_OVER = ("debug=smoke", "world=diff_small", "trainer.epochs=16", "trainer.batch_size=32",
             "trainer.save_every_steps=1000", "trainer.save_every_epochs=16",  # the diff reads the last epoch only
             "optim.lr=2e-3", "optim.warmup_steps=20")
REAL_A = run_name_of("unused", "lso-rs-nosketchclasses", *REAL_OVER)  # run names carry the settings
REAL_B = run_name_of("unused", "lso-rs-nosketchclasses-pseudo", *REAL_OVER)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory, one_torch_thread):
    """CG-low and its pseudo upper bound (the only designed difference: the held-out classes in sketch), trained
    on the diff_small world (4 classes) long enough to learn: ~9k samples per run, two one-thread processes
    (~1-2 minutes, depending on the machine's load). latest.pt is saved at epoch ends only; epoch checkpoints (each
    one evaluated) at 0 and 16 only."""
    from clipgen.launch.study import run_study

    with scratch_dir(tmp_path_factory, "diff_real") as root:
        run_study(make_cfg(root, *REAL_OVER, "study.name=diffreal", "study.recipes=[cg_low,cg_low_pseudo]",
                           "study.seeds=[0]", "study.parallel=2"))
        yield root


@pytest.mark.slow
def test_real_runs_top_hypothesis_names_heldout_classes_in_test_domain(real_runs):
    res = _diff(real_runs, REAL_A, REAL_B)
    meta = json.loads((real_runs / "runs" / REAL_A / "meta.json").read_text())
    heldout, d = meta["heldout_classes"], meta["test_domain"]
    top = res["top"][0]
    assert top["accepted"] and top["direction"] == "B"
    assert sorted(map(tuple, top["cells"])) == sorted((d, c) for c in heldout), top["text"]
    assert d in top["text"] and all(c in top["text"] for c in heldout)
