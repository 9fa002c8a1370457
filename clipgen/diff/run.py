"""``run_diff(cfg)``: how run B behaves differently from run A (protocol §8), as accepted/rejected hypotheses.

    clipgen-diff run_a=<run dir or name> run_b=<...> [null_run=<another seed of A's config>] [diff.alpha=0.01]

Writes ``{root}/diffs/{run_a}__vs__{run_b}/``: summary.md, hypotheses.jsonl, metrics.json (per generator, and
the seed-null control), accuracy_vs_frequency.png, delta_accuracy.png and diff.json (inputs' sha256s + the
diff config = the key; a rerun with the same key does nothing). With ``logger.backend=wandb`` the hypotheses
are logged as a W&B table (job_type "diff").
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from clipgen import layout, rundir
from clipgen.diff import summary as S
from clipgen.diff.generators import cluster, slice_diff
from clipgen.diff.dedup import merge
from clipgen.diff.metrics import acceptance_rate
from clipgen.diff.null import NullControl
from clipgen.diff.null import summarise as summarise_null
from clipgen.diff.predicates import BehaviourParams, Codes, hypothesis_text, slice_cells
from clipgen.diff.records import RunInfo, build_records, evaluated_epochs, load_run, pick_epoch, resolve_run
from clipgen.diff.scores import score
from clipgen.diff.split import split_mask
from clipgen.diff.verify import Verifier
from clipgen.errors import ClipgenError
from clipgen.utils import atomic_write_json, read_json, stable_hash

log = logging.getLogger("clipgen.diff")

GENERATORS = ("slice_diff", "cluster")
FILES = ("summary.md", "hypotheses.jsonl", "metrics.json", "accuracy_vs_frequency.png", "delta_accuracy.png")


def _clean(obj):
    """NaN/inf -> None, numpy scalars -> Python, so the JSON files are standard JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def diff_config(cfg: DictConfig) -> dict:
    d = OmegaConf.to_container(cfg.diff, resolve=True)
    unknown = [g for g in d["generators"] if g not in GENERATORS]
    if unknown:
        raise ClipgenError(f"diff.generators: unknown {unknown}: expected a subset of {list(GENERATORS)}")
    if not 0 <= float(d["alpha"]) < 1:
        raise ClipgenError(f"diff.alpha={d['alpha']}: expected a margin in [0, 1)")
    from clipgen.diff.llm import BACKENDS

    if d["llm_backend"] not in BACKENDS:
        raise ClipgenError(f"diff.llm_backend={d['llm_backend']!r}: expected one of {', '.join(BACKENDS)}")
    if not 0 < float(d["fdr_q"]) < 1:
        raise ClipgenError(f"diff.fdr_q={d['fdr_q']}: expected a level in (0, 1)")
    return d


def diff_pair(recs, d: dict) -> dict:
    """Generate, verify and score hypotheses for one pair of runs' records. Pure (no files)."""
    params = BehaviourParams(tau=float(d["tau"]), conf=float(d["confident"]))
    codes = Codes(recs)
    verify = split_mask(recs.sample_ids, recs.domain.astype(np.int64) * len(recs.classes) + recs.label, int(d["seed"]))
    index = slice_diff.GroupIndex(codes)
    verifier = Verifier(codes, verify, params, float(d["alpha"]))
    hyps, per_gen = [], {}
    for gen in d["generators"]:
        t0 = time.time()
        if gen == "slice_diff":
            raw = slice_diff.generate(codes, verify, params, fdr_q=float(d["fdr_q"]), min_slice=int(d["min_slice"]),
                                      max_hypotheses=int(d["max_hypotheses"]), seed=int(d["seed"]), index=index)
        else:
            raw = cluster.generate(codes, verify, params, seed=int(d["seed"]), max_points=int(d["cluster_max_points"]),
                                   pca_dim=int(d["cluster_pca_dim"]), min_slice=int(d["min_slice"]),
                                   max_hypotheses=int(d["max_hypotheses"]), fdr_q=float(d["fdr_q"]), index=index)
        out = []
        for h in raw:
            e = verifier.evaluate(h, n_evidence=int(d["evidence"]))
            e["id"] = len(hyps) + len(out)
            e["text"] = hypothesis_text(codes, h["slice"], h["behaviour"], h["direction"], h.get("target"), params)
            cells = slice_cells(codes, h["slice"])  # the slice as domain x class cells (when that is short)
            e["cells"] = [list(c) for c in cells] if len(cells) <= 100 else None
            e["interestingness"], e["abstraction"] = score(codes, e)
            out.append(e)
        merge(out, verifier, float(d["fdr_q"]))  # a generator's rows must not restate each other
        per_gen[gen] = generator_metrics(out, time.time() - t0)
        hyps += out
    # a cluster hypothesis that restates a slice_diff one is shown once, as found by both
    distinct = merge([h for h in hyps if h["duplicate_of"] is None], verifier, float(d["fdr_q"]), key="same_as",
                     members="also", across_generators=True)
    for h in hyps:
        h.setdefault("same_as", None)
        h["also_found_by"] = sorted({hyps[i]["generator"] for i in h.pop("also", [])} - {h["generator"]})
    return {"hypotheses": hyps, "distinct": distinct, "generators": per_gen, "verifier": verifier, "codes": codes}


def generator_metrics(out: list[dict], seconds: float) -> dict:
    """One generator's row: counts over its distinct hypotheses (its near-duplicates merged); acceptance,
    accuracy and frequency on the held-out verification split (the headline; accuracy and frequency averaged
    over every distinct hypothesis, since averaging over the verification-accepted ones would select on the
    split that measures them); the discovery acceptance rate beside it, labelled; scores over the accepted."""
    distinct = [h for h in out if h["duplicate_of"] is None]
    acc = [h for h in distinct if h["accepted"]]

    def mean(xs: list) -> float:  # NaN when empty
        xs = [x for x in xs if not math.isnan(x)]
        return float(np.mean(xs)) if xs else float("nan")

    return {"hypotheses": len(distinct), "merged": len(out) - len(distinct), "accepted": len(acc),
            "acceptance_rate": acceptance_rate(h["accepted"] for h in distinct),
            "verification_accuracy": mean([h["verification"]["accuracy"] for h in distinct]),
            "verification_frequency": mean([h["verification"]["frequency"] for h in distinct]),
            "discovery_acceptance_rate": acceptance_rate(h["discovery"]["accepted"] for h in distinct),
            "interestingness": mean([float(h["interestingness"]["score"]) for h in acc]),
            "abstraction": mean([float(h["abstraction"]["score"]) for h in acc]),
            "seconds": round(seconds, 3)}


def _hyp_key(h: dict) -> tuple:
    return (tuple(sorted(h["slice"].items())), h["behaviour"], h.get("target"), h["direction"])


def rank_key(h: dict) -> tuple:
    """Strongest evidence first: the discovery McNemar statistic toward the predicted side. (Ranking by effect
    size instead favours small slices picked on discovery, which verify worse.)"""
    return (-h["z"], h["text"])


def top_hypotheses(hyps: list[dict], k: int) -> list[dict]:
    """Accepted (verification) distinct hypotheses of every generator, near-duplicates left out (``dedup``) and
    any remaining same predicate merged, ranked by ``rank_key``."""
    best: dict = {}
    for h in hyps:
        if h["accepted"] and h.get("duplicate_of") is None and h.get("same_as") is None:
            key = _hyp_key(h)
            if key not in best or rank_key(h) < rank_key(best[key]):
                best[key] = h
    return sorted(best.values(), key=rank_key)[:k]


def _siblings(runs_root: Path, run: RunInfo) -> dict[int, Path]:
    """Other seeds of ``run``'s configuration (same recipe id and model) under the runs root, by seed."""
    out = {}
    if not runs_root.is_dir():
        return out
    for d in sorted(runs_root.iterdir()):
        try:
            meta = rundir.load_meta(d) if rundir.is_run(d) else None
        except ClipgenError:
            meta = None
        if (meta and meta.get("recipe_id") == run.meta.get("recipe_id")
                and meta.get("model_name") == run.meta.get("model_name") and meta.get("seed") is not None):
            out[int(meta["seed"])] = d.resolve()
    return out


def _domain_acc(recs) -> dict:
    out = {}
    for i, dname in enumerate(recs.domains):
        m = recs.domain == i
        out[dname] = (int(m.sum()), float(recs.correct_a[m].mean()), float(recs.correct_b[m].mean()))
    return out


def _log_wandb(cfg: DictConfig, out_dir: Path, name: str, hyps: list[dict], per_gen: dict) -> None:
    from clipgen.wandb_run import check_logger_config, group_of, open_run, stable_run_id

    check_logger_config(cfg)
    if cfg.logger.backend != "wandb":
        return
    import wandb

    ident = {"project": str(cfg.logger.project), "group": group_of(cfg), "name": f"diff-{name}", "job_type": "diff",
             "tags": [str(t) for t in (cfg.logger.get("tags") or [])]}
    run = open_run(cfg.logger.mode, out_dir, stable_run_id(out_dir), ident,
                   config={"diff": OmegaConf.to_container(cfg.diff, resolve=True), "run_a": cfg.run_a,
                           "run_b": cfg.run_b, "null_run": cfg.null_run})
    try:
        cols = ["id", "generator", "text", "accepted", "direction", "behaviour", "slice", "ver_accuracy",
                "ver_frequency", "ver_margin", "disc_accepted", "disc_accuracy", "disc_margin", "duplicate_of",
                "same_as", "null_ver_margin", "interestingness", "abstraction", "evidence"]
        rows = [[h["id"], h["generator"], h["text"], h["accepted"], h["direction"], h["behaviour"], str(h["slice"]),
                 h["verification"]["accuracy"], h["verification"]["frequency"], h["verification"]["margin"],
                 h["discovery"]["accepted"], h["discovery"]["accuracy"], h["discovery"]["margin"],
                 h["duplicate_of"], h["same_as"], h["null"]["verification"]["margin"] if h.get("null") else None,
                 h["interestingness"]["score"], h["abstraction"]["score"], ", ".join(h["evidence"])] for h in hyps]
        run.log({"diff/hypotheses": wandb.Table(columns=cols, data=rows)})
        for g, m in per_gen.items():
            for k, v in m.items():
                if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    run.summary[f"diff/{g}/{k}"] = v
    finally:
        wandb.finish()


def run_diff(cfg: DictConfig) -> dict:
    d = diff_config(cfg)
    runs_root = layout.runs_root(cfg)
    dir_a = resolve_run(cfg.run_a, runs_root, "run_a")
    dir_b = resolve_run(cfg.run_b, runs_root, "run_b")
    dir_n = resolve_run(cfg.null_run, runs_root, "null_run") if cfg.get("null_run") else None
    run_a, run_b = load_run(dir_a), load_run(dir_b)
    run_n = load_run(dir_n) if dir_n else None
    epoch = pick_epoch([p for p in (dir_a, dir_b, dir_n) if p], int(d["epoch"]))
    recs, shas = build_records(run_a, run_b, epoch)
    null_recs = None
    if run_n is not None:
        null_recs, null_shas = build_records(run_a, run_n, epoch)
        shas["null"] = null_shas["b"]

    siblings_a, siblings_b = _siblings(runs_root, run_a), _siblings(runs_root, run_b)
    pairs = [(s, siblings_a[s], siblings_b[s]) for s in sorted(set(siblings_a) & set(siblings_b))
             if siblings_a[s] != dir_a and siblings_b[s] != dir_b and siblings_a[s] != siblings_b[s]
             and epoch in evaluated_epochs(siblings_a[s])
             and epoch in evaluated_epochs(siblings_b[s])]
    noise_runs = [p for s, p in sorted(siblings_a.items()) if p != dir_a and epoch in evaluated_epochs(p)]
    if dir_n and dir_n not in noise_runs:
        noise_runs.append(dir_n)

    name = f"{run_a.name}__vs__{run_b.name}"
    out_dir = layout.diffs_root(cfg) / name
    key = stable_hash({"inputs": shas, "epoch": epoch, "diff": d, "seed_pairs": [str(p) for p in pairs],
                       "noise_runs": [str(p) for p in noise_runs], "version": 3})
    done = out_dir / "diff.json"
    if done.is_file() and all((out_dir / f).is_file() for f in FILES):
        prev = read_json(done, "diff record")
        if prev.get("key") == key:
            print(f"diff {name}: up to date (epoch {epoch}), nothing to do -> {out_dir}")
            return {**prev, "skipped": True}

    t0 = time.time()
    res = diff_pair(recs, d)
    hyps = res["hypotheses"]

    null = None
    if null_recs is not None:
        nres = diff_pair(null_recs, d)  # the seed pair's own diff: the false-discovery baseline
        control = NullControl(res["verifier"], null_recs, run_n.name)
        for h in hyps:  # the same hypotheses on the same images, judged with A's and the null run's predictions
            h["null"] = control.check(h)
        checked = [h for h in res["distinct"] if h["accepted"]]
        null = {"run": run_n.name, "generators": nres["generators"],
                **summarise_null(checked, nres["generators"], float(d["fdr_q"]))}

    # seed consistency: the same hypothesis on other seed pairs of the two configurations
    if pairs:
        verifiers = []
        for s, pa, pb in pairs:
            r, _ = build_records(load_run(pa), load_run(pb), epoch)
            v = Verifier(Codes(r), np.zeros(r.n, dtype=bool), res["verifier"].params, float(d["alpha"]))
            verifiers.append(v)
        for h in hyps:
            h["seed_consistency"] = float(np.mean([v.margin_all(h)[0] for v in verifiers]))

    # per-domain accuracy, with the spread over A's other seeds (incl. the null run) as seed noise
    dom = _domain_acc(recs)
    noise: dict[str, list[float]] = {k: [v[1]] for k, v in dom.items()}
    for p in noise_runs:
        r, _ = build_records(run_a, load_run(p), epoch)
        for k, v in _domain_acc(r).items():
            noise.setdefault(k, []).append(v[2])
    domain_acc = [{"domain": k, "n": v[0], "acc_a": v[1], "acc_b": v[2],
                   "seed_std": float(np.std(noise[k], ddof=1)) if len(noise[k]) > 1 else None} for k, v in dom.items()]

    top = top_hypotheses(hyps, int(d["top_k"]))
    llm_agreement = None
    if d["llm_backend"] != "none":
        from clipgen.diff.llm import LLM, annotate

        llm = LLM(d["llm_backend"], endpoint=d["llm_endpoint"], model=d["llm_model"],
                  model_path=d["llm_model_path"])
        chosen = sorted(hyps, key=lambda h: (not h["accepted"], rank_key(h)))[:int(d["llm_max_hypotheses"])]
        llm_agreement = annotate(chosen, llm)
    plots = {"accuracy vs frequency": S.plot_accuracy_vs_frequency(hyps, out_dir / "accuracy_vs_frequency.png"),
             "Δ accuracy per domain x class": S.plot_delta_heatmap(recs, out_dir / "delta_accuracy.png")}
    hyps_out = [_clean(dict(h)) for h in hyps]
    S.write_jsonl(out_dir / "hypotheses.jsonl", hyps_out)
    metrics = _clean({"generators": res["generators"], "null": null, "epoch": epoch, "alpha": d["alpha"],
                      "domain_accuracy": domain_acc, "seed_pairs": len(pairs), "n_images": recs.n,
                      "llm_agreement": llm_agreement,
                      "n_verification": int(res["verifier"].verify_mask.sum())})
    atomic_write_json(out_dir / "metrics.json", metrics)
    S.write_summary(out_dir / "summary.md", run_a=run_a, run_b=run_b, epoch=epoch, alpha=float(d["alpha"]),
                    domain_acc=domain_acc, generators=res["generators"], null=null, hypotheses=hyps, top=top,
                    domains=recs.domains, plots=plots, llm_agreement=llm_agreement)
    _log_wandb(cfg, out_dir, name, hyps, res["generators"])
    seconds = time.time() - t0
    result = _clean({"key": key, "diff_dir": str(out_dir), "run_a": str(dir_a), "run_b": str(dir_b),
                     "null_run": str(dir_n) if dir_n else None, "epoch": epoch, "n_images": recs.n,
                     "generators": res["generators"], "null": null,
                     "top": [{"text": h["text"], "generator": h["generator"], "slice": h["slice"],
                              "behaviour": h["behaviour"], "direction": h["direction"], "target": h.get("target"),
                              "cells": h["cells"], "accepted": h["accepted"],
                              "verification_accuracy": h["verification"]["accuracy"],
                              "verification_margin": h["verification"]["margin"], "z": h["z"],
                              "merged": len(h["merged"]), "also_found_by": h["also_found_by"],
                              "null": h.get("null")} for h in top],
                     "seconds": round(seconds, 2), "inputs": shas})
    atomic_write_json(done, result)
    print(f"diff {name} (epoch {epoch}, {recs.n} images, {seconds:.1f} s):")
    for g, m in res["generators"].items():
        print(f"  {g}: {m['accepted']}/{m['hypotheses']} distinct hypotheses accepted on the verification split")
    if null:
        print(f"  seed-null control ({null['run']}): {null['same_difference']}/{null['checked']} accepted also hold "
              f"between the seeds, {null['exceeds_null']}/{null['checked']} exceed them")
    for i, h in enumerate(top[:3], 1):
        print(f"  {i}. {h['text']}")
    print(f"  -> {out_dir}/summary.md")
    return {**result, "skipped": False}
