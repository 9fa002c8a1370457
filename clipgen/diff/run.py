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
from clipgen.diff.ranking import rank_key, top_hypotheses
from clipgen.diff.records import RunInfo, build_records, evaluated_epochs, load_run, pick_epoch, resolve_run
from clipgen.diff.scores import score
from clipgen.diff.split import split_mask
from clipgen.diff.summary import FILES, clean_json
from clipgen.diff.verify import Verifier
from clipgen.errors import ClipgenError
from clipgen.files import atomic_write_json, read_json
from clipgen.hashing import sha256_file, stable_hash

log = logging.getLogger("clipgen.diff")

GENERATORS = ("slice_diff", "cluster", "sae")


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
    for k in ("sae_latents", "sae_pca_dim", "sae_steps", "sae_batch_size", "sae_max_points"):
        if int(d[k]) < 1:
            raise ClipgenError(f"diff.{k}={d[k]}: expected a positive integer")
    if not float(d["sae_lr"]) > 0 or not float(d["sae_l1"]) >= 0:
        raise ClipgenError(f"diff.sae_lr={d['sae_lr']}, diff.sae_l1={d['sae_l1']}: expected lr > 0 and l1 >= 0")
    return d


def _generate(gen: str, codes: Codes, verify: np.ndarray, params: BehaviourParams, d: dict, index, vocab: dict | None,
              fits: dict) -> list[dict]:
    """One generator's raw hypotheses (discovery split only)."""
    common = {"min_slice": int(d["min_slice"]), "max_hypotheses": int(d["max_hypotheses"]),
              "fdr_q": float(d["fdr_q"]), "seed": int(d["seed"]), "index": index}
    if gen == "slice_diff":
        return slice_diff.generate(codes, verify, params, **common)
    if gen == "cluster":
        return cluster.generate(codes, verify, params, max_points=int(d["cluster_max_points"]),
                                pca_dim=int(d["cluster_pca_dim"]), **common)
    from clipgen.diff.generators import sae  # torch, only when the SAE generator runs

    return sae.generate(codes, verify, params, latents=int(d["sae_latents"]), pca_dim=int(d["sae_pca_dim"]),
                        steps=int(d["sae_steps"]), batch_size=int(d["sae_batch_size"]), lr=float(d["sae_lr"]),
                        l1=float(d["sae_l1"]), max_points=int(d["sae_max_points"]), alpha=float(d["alpha"]),
                        vocab=vocab, summary=fits.setdefault(gen, {}), **common)


def diff_pair(recs, d: dict, vocab: dict | None = None) -> dict:
    """Generate, verify and score hypotheses for one pair of runs' records. Pure (no files). ``vocab`` (from
    ``concepts.vocabulary``) names the SAE generator's latents."""
    params = BehaviourParams(tau=float(d["tau"]), conf=float(d["confident"]))
    codes = Codes(recs)
    verify = split_mask(recs.sample_ids, recs.domain.astype(np.int64) * len(recs.classes) + recs.label, int(d["seed"]))
    index = slice_diff.GroupIndex(codes)
    verifier = Verifier(codes, verify, params, float(d["alpha"]))
    hyps, per_gen, fits = [], {}, {}
    for gen in d["generators"]:
        t0, c0 = time.time(), time.process_time()
        out = []
        for h in _generate(gen, codes, verify, params, d, index, vocab, fits):
            e = verifier.evaluate(h, n_evidence=int(d["evidence"]))
            e["id"] = len(hyps) + len(out)
            e["text"] = hypothesis_text(codes, h["slice"], h["behaviour"], h["direction"], h.get("target"), params)
            cells = slice_cells(codes, h["slice"])  # the slice as domain x class cells (when that is short)
            e["cells"] = [list(c) for c in cells] if len(cells) <= 100 else None
            e["interestingness"], e["abstraction"] = score(codes, e)
            out.append(e)
        merge(out, verifier, float(d["fdr_q"]))  # a generator's rows must not restate each other
        per_gen[gen] = generator_metrics(out, time.time() - t0, time.process_time() - c0)
        if gen in fits:
            per_gen[gen]["dictionary"] = fits[gen]  # the crosscoder's fit: reconstruction, sparsity, dead latents
        hyps += out
    # a cluster or SAE hypothesis that restates an earlier generator's is shown once, as found by both
    distinct = merge([h for h in hyps if h["duplicate_of"] is None], verifier, float(d["fdr_q"]), key="same_as",
                     members="also", across_generators=True)
    for h in hyps:
        h.setdefault("same_as", None)
        h["also_found_by"] = sorted({hyps[i]["generator"] for i in h.pop("also", [])} - {h["generator"]})
    return {"hypotheses": hyps, "distinct": distinct, "generators": per_gen, "verifier": verifier, "codes": codes}


def generator_metrics(out: list[dict], seconds: float, cpu_seconds: float) -> dict:
    """One generator's row: counts over its distinct hypotheses (its near-duplicates merged); acceptance,
    accuracy and frequency on the held-out verification split (the headline; accuracy and frequency averaged
    over every distinct hypothesis, since averaging over the verification-accepted ones would select on the
    split that measures them); the discovery acceptance rate beside it, labelled; scores over the accepted; the
    generator's wall and CPU seconds (generation, verification, scoring, its own near-duplicate merge)."""
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
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3)}


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
    """One pair (``run_a``, ``run_b``), or without them and with ``diff.contrasts`` the methods comparison."""
    d = diff_config(cfg)
    if not cfg.get("run_a") and not cfg.get("run_b") and d["contrasts"]:
        from clipgen.diff.compare import run_comparison

        return run_comparison(cfg, d, diff_runs)
    return diff_runs(cfg, d)


def _inputs(cfg: DictConfig, d: dict) -> dict:
    """The two runs (and the null run), their aligned records at the diffed epoch, the other seeds, the key."""
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
    if d["sae_vocab_file"] and "sae" in d["generators"]:
        from clipgen.diff.concepts import read_vocab

        read_vocab(d["sae_vocab_file"])  # a wrong path fails before any work
        shas["vocab"] = sha256_file(Path(str(d["sae_vocab_file"])).expanduser())

    siblings_a, siblings_b = _siblings(runs_root, run_a), _siblings(runs_root, run_b)
    pairs = [(s, siblings_a[s], siblings_b[s]) for s in sorted(set(siblings_a) & set(siblings_b))
             if siblings_a[s] != dir_a and siblings_b[s] != dir_b and siblings_a[s] != siblings_b[s]
             and epoch in evaluated_epochs(siblings_a[s])
             and epoch in evaluated_epochs(siblings_b[s])]
    noise_runs = [p for s, p in sorted(siblings_a.items()) if p != dir_a and epoch in evaluated_epochs(p)]
    if dir_n and dir_n not in noise_runs:
        noise_runs.append(dir_n)
    name = f"{run_a.name}__vs__{run_b.name}"
    from clipgen.diff.compare import pair_settings

    key = stable_hash({"inputs": shas, "epoch": epoch, "diff": pair_settings(d), "seed_pairs": [str(p) for p in pairs],
                       "noise_runs": [str(p) for p in noise_runs], "version": 5})
    return {"dir_a": dir_a, "dir_b": dir_b, "dir_n": dir_n, "run_a": run_a, "run_b": run_b, "run_n": run_n,
            "epoch": epoch, "recs": recs, "null_recs": null_recs, "shas": shas, "pairs": pairs,
            "noise_runs": noise_runs, "name": name, "out_dir": layout.diffs_root(cfg) / name, "key": key}


def _seed_null(res: dict, inp: dict, d: dict) -> dict | None:
    """The null pair's own diff (the false-discovery baseline) and every A-vs-B hypothesis re-judged on its own
    images with A's and the null run's predictions."""
    if inp["null_recs"] is None:
        return None
    nres = diff_pair(inp["null_recs"], d)
    control = NullControl(res["verifier"], inp["null_recs"], inp["run_n"].name)
    for h in res["hypotheses"]:
        h["null"] = control.check(h)
    checked = [h for h in res["distinct"] if h["accepted"]]
    return {"run": inp["run_n"].name, "generators": nres["generators"],
            **summarise_null(checked, nres["generators"], float(d["fdr_q"]))}


def _seed_consistency(res: dict, inp: dict, d: dict) -> None:
    """The same hypotheses on the other seed pairs of the two configurations (share of pairs where each holds, on
    all their images), and per generator its mean over the accepted distinct hypotheses."""
    if not inp["pairs"]:
        return
    verifiers = []
    for _, pa, pb in inp["pairs"]:
        r, _ = build_records(load_run(pa), load_run(pb), inp["epoch"])
        verifiers.append(Verifier(Codes(r), np.zeros(r.n, dtype=bool), res["verifier"].params, float(d["alpha"])))
    for h in res["hypotheses"]:
        h["seed_consistency"] = float(np.mean([v.margin_all(h)[0] for v in verifiers]))
    for g, m in res["generators"].items():  # over each generator's accepted distinct hypotheses
        vals = [h["seed_consistency"] for h in res["hypotheses"]
                if h["generator"] == g and h["accepted"] and h["duplicate_of"] is None]
        m["seed_consistency"] = float(np.mean(vals)) if vals else float("nan")


def _domain_accuracy(inp: dict) -> list[dict]:
    """Per domain: images, A's and B's accuracy, and the spread over A's other seeds (incl. the null run)."""
    dom = _domain_acc(inp["recs"])
    noise: dict[str, list[float]] = {k: [v[1]] for k, v in dom.items()}
    for p in inp["noise_runs"]:
        r, _ = build_records(inp["run_a"], load_run(p), inp["epoch"])
        for k, v in _domain_acc(r).items():
            noise.setdefault(k, []).append(v[2])
    return [{"domain": k, "n": v[0], "acc_a": v[1], "acc_b": v[2],
             "seed_std": float(np.std(noise[k], ddof=1)) if len(noise[k]) > 1 else None} for k, v in dom.items()]


def _top_record(h: dict) -> dict:
    return {"text": h["text"], "generator": h["generator"], "slice": h["slice"], "behaviour": h["behaviour"],
            "direction": h["direction"], "target": h.get("target"), "cells": h["cells"], "accepted": h["accepted"],
            "verification_accuracy": h["verification"]["accuracy"],
            "verification_margin": h["verification"]["margin"], "z": h["z"], "merged": len(h["merged"]),
            "also_found_by": h["also_found_by"], "null": h.get("null")}


def _write(cfg: DictConfig, d: dict, inp: dict, res: dict, null: dict | None, domain_acc: list[dict],
           t0: float) -> dict:
    """summary.md, hypotheses.jsonl, metrics.json, the plots, W&B, and diff.json last (the key)."""
    hyps, out_dir, recs = res["hypotheses"], inp["out_dir"], inp["recs"]
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
    S.write_jsonl(out_dir / "hypotheses.jsonl", [clean_json(dict(h)) for h in hyps])
    atomic_write_json(out_dir / "metrics.json", clean_json({
        "generators": res["generators"], "null": null, "epoch": inp["epoch"], "alpha": d["alpha"],
        "domain_accuracy": domain_acc, "seed_pairs": len(inp["pairs"]), "n_images": recs.n,
        "llm_agreement": llm_agreement, "n_verification": int(res["verifier"].verify_mask.sum())}))
    S.write_summary(out_dir / "summary.md", run_a=inp["run_a"], run_b=inp["run_b"], epoch=inp["epoch"],
                    alpha=float(d["alpha"]), domain_acc=domain_acc, generators=res["generators"], null=null,
                    hypotheses=hyps, top=top, domains=recs.domains, plots=plots, llm_agreement=llm_agreement)
    _log_wandb(cfg, out_dir, inp["name"], hyps, res["generators"])
    result = clean_json({"key": inp["key"], "diff_dir": str(out_dir), "run_a": str(inp["dir_a"]),
                     "run_b": str(inp["dir_b"]), "null_run": str(inp["dir_n"]) if inp["dir_n"] else None,
                     "epoch": inp["epoch"], "n_images": recs.n, "generators": res["generators"], "null": null,
                     "top": [_top_record(h) for h in top], "seconds": round(time.time() - t0, 2),
                     "inputs": inp["shas"]})
    atomic_write_json(out_dir / "diff.json", result)
    return result


def _print_result(result: dict, quiet: bool) -> None:
    name = Path(result["diff_dir"]).name
    if quiet:
        print(f"diff {name}: " + ", ".join(f"{g} {m['accepted']}/{m['hypotheses']}"
                                           for g, m in result["generators"].items()) + " accepted")
        return
    print(f"diff {name} (epoch {result['epoch']}, {result['n_images']} images, {result['seconds']:.1f} s):")
    for g, m in result["generators"].items():
        print(f"  {g}: {m['accepted']}/{m['hypotheses']} distinct hypotheses accepted on the verification split")
    null = result.get("null")
    if null:
        print(f"  seed-null control ({null['run']}): {null['same_difference']}/{null['checked']} accepted also hold "
              f"between the seeds, {null['exceeds_null']}/{null['checked']} exceed them")
    for i, h in enumerate(result["top"][:3], 1):
        print(f"  {i}. {h['text']}")
    print(f"  -> {result['diff_dir']}/summary.md")


def diff_runs(cfg: DictConfig, d: dict | None = None, quiet: bool = False) -> dict:
    """The diff of ``cfg.run_a`` and ``cfg.run_b`` (``quiet``: one line, for the comparison's many pairs)."""
    d = d or diff_config(cfg)
    inp = _inputs(cfg, d)
    done = inp["out_dir"] / "diff.json"
    if done.is_file() and all((inp["out_dir"] / f).is_file() for f in FILES):
        prev = read_json(done, "diff record")
        if prev.get("key") == inp["key"]:
            print(f"diff {inp['name']}: up to date (epoch {inp['epoch']}), nothing to do -> {inp['out_dir']}")
            return {**prev, "skipped": True}
    t0 = time.time()
    vocab = None
    if "vocab" in inp["shas"]:
        from clipgen.diff.concepts import vocabulary

        vocab = vocabulary(d["sae_vocab_file"], inp["run_a"], inp["run_b"], inp["epoch"], str(cfg.eval.templates))
    res = diff_pair(inp["recs"], d, vocab)
    null = _seed_null(res, inp, d)
    _seed_consistency(res, inp, d)
    result = _write(cfg, d, inp, res, null, _domain_accuracy(inp), t0)
    _print_result(result, quiet)
    return {**result, "skipped": False}
