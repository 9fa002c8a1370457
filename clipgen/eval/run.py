"""``run_eval(cfg)``: zero-shot evaluation of every checkpoint of one run (SPEC §6, §9).

Task ``domainnet-{D}``: the test split of real and the run's test domain D, classified over all of the run's
classes (``meta["classes"]``; label = index in that list). A natural-only run does not depend on D, so it gets
one task per test domain. Images are decoded once, every checkpoint embeds them once, tasks are subsets.

    {run}/eval/results.jsonl         one line per (checkpoint, task), appended + fsynced; finished pairs skipped
    {run}/eval/outputs/epoch_NNN.npz sample_ids, domains, labels, preds, logits (f16), image_embeddings (f16),
                                     logit_scale (logits = logit_scale x cosine, so softmax = the model's probs)
    {run}/eval/zeroshot_head.json    the head's class names and templates (results never mix two heads)

A pair is finished when a line with the same checkpoint file name, checkpoint sha256 and task exists, so a
killed evaluation resumes where it stopped and a retrained checkpoint is evaluated again. A truncated last
line (the process died mid-write) is dropped and the file rewritten atomically without it. Metrics that are
NaN (empty groups, see clipgen.eval.metrics) are written as JSON ``null`` and read back as NaN.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from clipgen import layout
from clipgen.errors import ClipgenError
from clipgen.facts import NATURAL_DOMAIN, TEST_DOMAINS, zeroshot_templates
from clipgen.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, git_sha, read_json, sha256_file

log = logging.getLogger("clipgen.eval")

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# Above this many bytes of decoded uint8 pixels the test set is kept in a disk-backed memmap (DomainNet's
# real + D test split at 224 px is ~10 GB) instead of in memory.
_IN_MEMORY_LIMIT = 2 << 30


# --- results.jsonl -------------------------------------------------------------------------------------------
def _nan_to_null(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(v) for v in obj]
    return obj


def _null_to_nan(metrics: dict) -> dict:
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


def read_results(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """Records of a results.jsonl and whether its last line was cut off (that line is left out). A corrupt line
    anywhere else is an error: it cannot come from a killed append."""
    path = Path(path)
    if not path.exists():
        return [], False
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, truncated = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                truncated = True
                break
            raise ClipgenError(f"{path}:{i + 1} is not valid JSON: expected one result object per line "
                               "(remove or fix that line)") from None
        if not isinstance(rec, dict):
            raise ClipgenError(f"{path}:{i + 1} is not a JSON object: expected one result object per line")
        rec["metrics"] = _null_to_nan(rec.get("metrics") or {})
        records.append(rec)
    # A last line without its newline is also the remains of an interrupted append.
    truncated = truncated or (bool(raw) and not raw.endswith("\n"))
    return records, truncated


def _rewrite_results(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_nan_to_null(r), sort_keys=True) + "\n" for r in records))


def append_result(path: str | os.PathLike, record: dict) -> None:
    """Append one line and force it to disk before the next checkpoint starts."""
    line = json.dumps(_nan_to_null(record), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _done_key(rec: dict) -> tuple[str, str, str]:
    return Path(str(rec.get("checkpoint", ""))).name, str(rec.get("checkpoint_sha256")), str(rec.get("task"))


@contextmanager
def _exclusive(eval_dir: Path):
    """One evaluator per run at a time; flock is released when the process dies, so no stale lock files."""
    with open(eval_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ClipgenError(f"{eval_dir} is being evaluated by another process: expected one clipgen-eval "
                                   "per run at a time") from None
            # Some network filesystems do not support flock; evaluate unlocked rather than not at all.
            log.warning("%s: cannot lock (%s); make sure no other clipgen-eval runs on this run", eval_dir, e)
        yield


# --- the run and its data ------------------------------------------------------------------------------------
def resolve_run_dir(cfg: DictConfig) -> Path:
    """``eval.run_dir`` if set, else the run the config names (recipe, model, seed or ``run_name``)."""
    if cfg.eval.get("run_dir"):
        run_dir = Path(os.path.expanduser(str(cfg.eval.run_dir))).resolve()
        todo = "point eval.run_dir at a run directory written by clipgen-train"
    else:
        from clipgen.recipes.naming import recipe_spec

        rid = recipe_spec(cfg.recipe).recipe_id
        run_dir = layout.runs_root(cfg) / layout.run_name(cfg, rid)
        todo = (f"train it first (clipgen-train recipe={cfg.recipe.kind} recipe.test_domain={cfg.recipe.test_domain} "
                f"model.name={cfg.model.name} trainer.seed={cfg.trainer.seed} with the same overrides) or set "
                "eval.run_dir")
    if not run_dir.is_dir():
        raise ClipgenError(f"run directory {str(run_dir)!r} does not exist: {todo}")
    if not (run_dir / "meta.json").is_file():
        raise ClipgenError(f"{run_dir / 'meta.json'} is missing (training never started there): {todo}")
    return run_dir


@dataclass
class EvalSet:
    """The test images of every task of a run, decoded once and shared by all checkpoints and tasks."""

    sample_ids: np.ndarray
    domains: np.ndarray
    labels: np.ndarray  # index into the run's classes
    images: np.ndarray  # uint8 [n, 3, px, px]
    tasks: dict[str, tuple[str, np.ndarray]]  # task name -> (test domain D, boolean mask of its images)


def task_domains(meta: dict) -> list[str]:
    """Test domains a run is evaluated on: its own D; a natural-only run is the same run for every D (its recipe
    id does not name one), so it is evaluated on all of them and appears in every test domain's figure."""
    if meta.get("recipe_kind") == "natural_only":
        return [meta["test_domain"]] + [d for d in TEST_DOMAINS if d != meta["test_domain"]]
    return [meta["test_domain"]]


def _select_test_samples(run_cfg: DictConfig, meta: dict, meta_path: Path, domains: list[str]):
    from clipgen.data.sources import domainnet_index

    classes = list(meta["classes"])
    index = domainnet_index(run_cfg)
    available = {s.class_name for s in index}
    missing = [c for c in classes if c not in available]
    if missing:
        raise ClipgenError(f"{meta_path} lists classes {missing[:5]}{' ...' if len(missing) > 5 else ''} that the "
                           f"run's data has no images of: expected meta classes to be a subset of the "
                           f"{len(available)} classes of the data the run was trained on")
    keep, wanted = set(classes), {NATURAL_DOMAIN, *domains}
    picked = [s for s in index if s.split == "test" and s.domain in wanted and s.class_name in keep]
    for d in domains:
        if not any(s.domain == d for s in picked):
            raise ClipgenError(f"no test images of domain {d!r} and the run's classes in its data: expected the "
                               f"test split of {NATURAL_DOMAIN} and {d}")
    return picked


def load_eval_set(run_cfg: DictConfig, meta: dict, meta_path: Path, image_px: int, cache_dir: Path) -> EvalSet:
    from clipgen.eval.zeroshot import decode_images

    domains = task_domains(meta)
    picked = _select_test_samples(run_cfg, meta, meta_path, domains)
    n = len(picked)
    out = None
    if n * 3 * image_px * image_px > _IN_MEMORY_LIMIT:
        out = np.memmap(cache_dir / "images.u8", dtype=np.uint8, mode="w+", shape=(n, 3, image_px, image_px))
    images = decode_images([s.path for s in picked], image_px, out=out)
    index = {c: i for i, c in enumerate(meta["classes"])}
    dom = np.array([s.domain for s in picked])
    tasks = {task_name(d): (d, np.isin(dom, [NATURAL_DOMAIN, d])) for d in domains}
    return EvalSet(sample_ids=np.array([s.sample_id for s in picked]), domains=dom,
                   labels=np.array([index[s.class_name] for s in picked], dtype=np.int64), images=images,
                   tasks=tasks)


def task_name(test_domain: str) -> str:
    return f"domainnet-{test_domain}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoints/epoch_NNN.pt`` in epoch order (numerically, whatever the padding)."""
    found = []
    for p in (run_dir / "checkpoints").glob("epoch_*.pt"):
        m = _EPOCH_FILE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_checkpoint(path: Path, meta: dict, image_px: int):
    """Model (eval mode) and checkpoint dict; every way a checkpoint can disagree with its run is a
    ClipgenError naming the file and what was expected, not a torch stack trace."""
    import torch

    from clipgen.train.model import create_clip

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated files surface as several different torch/pickle errors
        raise ClipgenError(f"checkpoint {str(path)!r} cannot be loaded ({type(e).__name__}): expected a file "
                           "written by clipgen-train (torch.load weights_only=True)") from None
    for key in ("state_dict", "model_name"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise ClipgenError(f"checkpoint {str(path)!r} has no {key!r}: expected the keys state_dict, "
                               "model_name, model_cfg, epoch, step, samples_seen (docs/formats.md)")
    name = ckpt["model_name"]
    if meta.get("model_name") and name != meta["model_name"]:
        raise ClipgenError(f"checkpoint {str(path)!r} has model_name {name!r}: expected the run's model "
                           f"{meta['model_name']!r} (meta.json)")
    model, tokenizer = create_clip(name, image_px)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        own = model.state_dict()
        theirs = ckpt["state_dict"]
        missing = [k for k in own if k not in theirs]
        unexpected = [k for k in theirs if k not in own]
        shapes = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]
        detail = (f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]}), {len(shapes)} of another shape (e.g. {shapes[:2]})")
        if not (missing or unexpected or shapes):
            detail = str(e).splitlines()[0]
        raise ClipgenError(f"checkpoint {str(path)!r} does not fit model {name!r}: {detail}; expected a "
                           f"state_dict of {name} with open_clip key names") from None
    return model.eval(), tokenizer, ckpt


def _device(cfg: DictConfig) -> str:
    import torch

    want = str(cfg.trainer.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ClipgenError("trainer.device=cuda but no CUDA device is visible: expected auto or cpu here")
    return want


def _check_head(path: Path, classes: list[str], templates: list[str]) -> None:
    """Write the head once; refuse to mix results of two heads in one eval directory."""
    head = {"classes": classes, "templates": templates}
    if path.exists():
        old = read_json(path, "zero-shot head")
        for key in ("classes", "templates"):
            if old.get(key) != head[key]:
                raise ClipgenError(f"{path} has other {key} ({len(old.get(key) or [])}) than this evaluation "
                                   f"({len(head[key])}): expected the same zero-shot head for every checkpoint "
                                   f"(evaluate into a fresh eval/ directory or keep eval.templates)")
    else:
        atomic_write_json(path, head)


# --- the stage -----------------------------------------------------------------------------------------------
def run_eval(cfg: DictConfig) -> dict:
    """Evaluate every checkpoint of a run on its test-domain task(s); see the module docstring for outputs."""
    import torch

    from clipgen.eval.metrics import lso_metrics
    from clipgen.eval.zeroshot import evaluate, tokenize_prompts

    run_dir = resolve_run_dir(cfg)
    meta_path = run_dir / "meta.json"
    meta = read_json(meta_path, "run meta")
    for key in ("classes", "heldout_classes", "test_domain"):
        if key not in meta:
            raise ClipgenError(f"{meta_path} has no {key!r}: expected a meta.json written by clipgen-train")
    if not (run_dir / "config.yaml").is_file():
        raise ClipgenError(f"{run_dir / 'config.yaml'} is missing: expected the run's resolved config")
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    classes, heldout = list(meta["classes"]), list(meta["heldout_classes"])
    bad = [c for c in heldout if c not in classes]
    if bad:
        raise ClipgenError(f"{meta_path} heldout_classes {bad} are not in its classes: expected the held-out "
                           "classes to be among the classes")
    image_px = int(meta.get("image_px") or run_cfg.model.image_px)
    templates = list(zeroshot_templates(cfg.eval.templates))
    batch_size = int(cfg.eval.batch_size)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    device = _device(cfg)
    tasks = [task_name(d) for d in task_domains(meta)]

    eval_dir = run_dir / "eval"
    (eval_dir / "outputs").mkdir(parents=True, exist_ok=True)
    results_path = eval_dir / "results.jsonl"
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise ClipgenError(f"no checkpoints/epoch_*.pt in {run_dir}: expected at least the untrained epoch_000.pt")

    n_new, eval_sha = 0, git_sha()
    with _exclusive(eval_dir), tempfile.TemporaryDirectory(prefix=".cache-", dir=eval_dir) as cache:
        records, truncated = read_results(results_path)
        if truncated:
            log.warning("%s: dropping a truncated last line left by an interrupted evaluation", results_path)
            _rewrite_results(results_path, records)
        done = {_done_key(r) for r in records}
        _check_head(eval_dir / "zeroshot_head.json", classes, templates)

        todo = []
        for epoch, path in checkpoints:
            sha = sha256_file(path)
            missing = [t for t in tasks if (path.name, sha, t) not in done]
            if missing:
                todo.append((epoch, path, sha, missing))
        n_done = len(checkpoints) * len(tasks) - sum(len(m) for *_, m in todo)
        tokens_by_model: dict[str, object] = {}
        evalset = None
        for epoch, path, sha, missing in todo:
            if evalset is None:  # decoded only when there is something to evaluate
                evalset = load_eval_set(run_cfg, meta, meta_path, image_px, Path(cache))
            t0 = time.time()
            model, tokenizer, ckpt = load_checkpoint(path, meta, image_px)
            if int(ckpt.get("epoch", epoch)) != epoch:
                raise ClipgenError(f"checkpoint {str(path)!r} records epoch {ckpt.get('epoch')}: expected {epoch} "
                                   "as in its file name")
            name = ckpt["model_name"]
            if name not in tokens_by_model:  # tokenise once for all checkpoints of a model
                tokens_by_model[name] = tokenize_prompts(tokenizer, classes, templates)
            # Every image of every task is embedded once per checkpoint; tasks are subsets of them.
            out = evaluate(model, evalset.images, evalset.labels, tokenizer, classes, templates, device,
                           batch_size, tokens=tokens_by_model[name])
            if cfg.eval.save_outputs:
                _save_outputs(eval_dir / "outputs" / f"epoch_{epoch:03d}.npz", evalset, out)
            seconds = round(time.time() - t0, 3)
            for task in missing:
                d, mask = evalset.tasks[task]
                metrics = lso_metrics(out["logits"][mask], evalset.labels[mask], evalset.domains[mask], classes,
                                      heldout, [d, NATURAL_DOMAIN])
                rec = {"task": task, "metrics": metrics, "run": meta.get("run_name", run_dir.name),
                       "recipe_id": meta.get("recipe_id"), "recipe_kind": meta.get("recipe_kind"),
                       "manifest_sha256": meta.get("manifest_sha256"), "seed": meta.get("seed"), "test_domain": d,
                       "checkpoint": str(path), "checkpoint_sha256": sha, "epoch": epoch, "step": ckpt.get("step"),
                       "samples_seen": ckpt.get("samples_seen"), "git_sha": meta.get("git_sha"),
                       "eval_git_sha": eval_sha,
                       "eval_config": {"templates": str(cfg.eval.templates), "batch_size": batch_size},
                       "model_name": name, "num_images": int(mask.sum()), "logit_scale": out["logit_scale"],
                       "seconds": seconds}
                append_result(results_path, rec)
                records.append(rec)
                n_new += 1
                log.info("%s %s epoch %d: %s-lso-ood=%.4f (%d images, %.1fs)", run_dir.name, task, epoch, d,
                         metrics[f"{d}-lso-ood"], rec["num_images"], seconds)
            del model

    by_task = {t: sorted((r for r in records if r.get("task") == t), key=lambda r: int(r.get("epoch", -1)))
               for t in tasks}
    for task, d in zip(tasks, task_domains(meta)):
        _print_table(f"{run_dir.name} {task}", d, by_task[task])
    main = by_task[tasks[0]]
    return {"run_dir": str(run_dir), "evaluated": n_new, "skipped": n_done, "results": str(results_path),
            "final": main[-1]["metrics"] if main else {}}


def _save_outputs(path: Path, evalset: EvalSet, out: dict) -> None:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, sample_ids=evalset.sample_ids, domains=evalset.domains, labels=evalset.labels,
                        preds=out["preds"].astype(np.int64), logits=out["logits"].astype(np.float16),
                        image_embeddings=out["image_embeddings"].astype(np.float16),
                        logit_scale=np.float32(out["logit_scale"]))
    atomic_write_bytes(path, buf.getvalue())


def _print_table(run: str, d: str, records: list[dict]) -> None:
    cols = (f"{d}-lso-ood", f"{d}-lso-id", f"{NATURAL_DOMAIN}-lso-ood")
    lines = [f"{run}", f"{'epoch':>5}  " + "  ".join(f"{c:>16}" for c in cols)]
    for r in records:
        vals = [r["metrics"].get(c, float("nan")) for c in cols]
        lines.append(f"{int(r['epoch']):>5}  " + "  ".join(f"{v:>16.4f}" for v in vals))
    print("\n".join(lines))
