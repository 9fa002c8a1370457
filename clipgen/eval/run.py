"""``run_eval(cfg)``: evaluation of every checkpoint of one run (protocol §6, §9).

Task ``domainnet-{D}``: the test split of real and the run's test domain D, classified over all of the run's
classes (``meta["classes"]``; label = index in that list); a natural-only run gets one task per test domain.
With ``eval.imagenet_val_root`` a CLIP run also gets ``imagenet-val`` (1000-way, open_clip's class names, the
same templates). Images are decoded once, every checkpoint embeds them once, text is tokenised once per run.
``meta.json["model_kind"]`` picks the head: CLIP's zero-shot head, or the supervised baseline's DomainNet columns
(clipgen.models.kinds); the metric keys are the same.

    {run}/eval/results.jsonl         one line per (checkpoint, task), appended + fsynced; finished pairs skipped
                                     (clipgen.eval.results)
    {run}/eval/outputs/epoch_NNN.npz sample_ids, domains, labels, preds, logits (f16), image_embeddings (f16),
                                     logit_scale (logits = logit_scale x cosine, so softmax = the model's probs)
    {run}/eval/outputs/epoch_NNN.imagenet-val.npz  sample_ids, labels, top5 (ImageNet indices, best first)
    {run}/eval/zeroshot_head.json    the head's class names and templates (results never mix two heads)

With ``logger.backend=wandb`` each new checkpoint's metrics also go to the training run's W&B run as
``eval/<task>/<metric>`` over ``eval/epoch`` (clipgen.eval.tracking).
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from clipgen import rundir
from clipgen.errors import ClipgenError
from clipgen.eval.results import append_result, done_key, exclusive, read_results, rewrite_results
from clipgen.eval.testsets import (IMAGENET_TASK, EvalSet, imagenet_classnames, imagenet_val_samples, load_eval_set,
                                   load_imagenet_set, task_domains, task_name)
from clipgen.facts import NATURAL_DOMAIN, zeroshot_templates
from clipgen.models.kinds import kind_for, load_checkpoint, model_kind
from clipgen.utils import atomic_write_bytes, atomic_write_json, git_sha, read_json, sha256_file

# Re-exported: the report and older callers import these from here.
__all__ = ["run_eval", "read_results", "append_result", "list_checkpoints", "resolve_run_dir",
           "task_name", "task_domains", "EvalSet", "load_eval_set"]

log = logging.getLogger("clipgen.eval")



# --- the run -------------------------------------------------------------------------------------------------
def resolve_run_dir(cfg: DictConfig) -> Path:
    """``eval.run_dir`` if set, else the run the config names (recipe, model, seed or ``run_name``)."""
    return rundir.resolve_run_dir(cfg, cfg.eval.get("run_dir"), "eval.run_dir")


list_checkpoints = rundir.checkpoints  # re-exported for older callers


def _device(cfg: DictConfig) -> str:
    import torch

    want = str(cfg.trainer.get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ClipgenError("trainer.device=cuda but no CUDA device is visible: expected auto or cpu here")
    return want


def _check_head(path: Path, head: dict) -> None:
    """Write the head once; refuse to mix results of two heads in one eval directory. Keys the file lacks
    (a head written before ImageNet val was added) are added."""
    if not path.exists():
        atomic_write_json(path, head)
        return
    old = read_json(path, "zero-shot head")
    old.setdefault("model_kind", "clip")
    for key, value in head.items():
        if key in old and old[key] != value:
            raise ClipgenError(f"{path} has other {key} ({_size(old[key])}) than this evaluation ({_size(value)}): "
                               "expected the same zero-shot head for every checkpoint (evaluate into a fresh eval/ "
                               "directory or keep eval.templates)")
    if any(key not in old for key in head):
        atomic_write_json(path, {**old, **head})


def _size(value) -> str:
    return str(len(value)) if isinstance(value, (list, tuple)) else repr(value)


def read_run_meta(run_dir: Path) -> tuple[dict, Path]:
    """A trained run's meta.json (checked for what evaluation and analyses need) and its path."""
    meta = rundir.load_meta(run_dir, need=("classes", "heldout_classes", "test_domain"))
    if not rundir.config_path(run_dir).is_file():
        raise ClipgenError(f"{rundir.config_path(run_dir)} is missing: expected the run's resolved config")
    return meta, rundir.meta_path(run_dir)


def _load_run(cfg: DictConfig):
    run_dir = resolve_run_dir(cfg)
    meta, meta_path = read_run_meta(run_dir)
    bad = [c for c in meta["heldout_classes"] if c not in meta["classes"]]
    if bad:
        raise ClipgenError(f"{meta_path} heldout_classes {bad} are not in its classes: expected the held-out "
                           "classes to be among the classes")
    return run_dir, meta_path, meta, OmegaConf.load(rundir.config_path(run_dir))


# --- the stage -----------------------------------------------------------------------------------------------
def run_eval(cfg: DictConfig) -> dict:
    """Evaluate every checkpoint of a run on its task(s); see the module docstring for outputs."""
    import torch

    from clipgen.eval.metrics import lso_metrics
    from clipgen.eval.testsets import imagenet_metrics
    from clipgen.eval.tracking import EvalTracker
    from clipgen.models.zeroshot import tokenize_prompts
    from clipgen.preflight import check_values

    check_values(cfg)  # trainer.seed=-1 would look for a run "--seed-1"; eval.batch_size=0 fails in torch
    run_dir, meta_path, meta, run_cfg = _load_run(cfg)
    kind = model_kind(meta, meta_path)
    run_kind = kind_for(kind)
    text_head = run_kind.text_head  # CLIP's zero-shot head (templates, ImageNet) or a classifier's
    classes, heldout = list(meta["classes"]), list(meta["heldout_classes"])
    image_px = int(meta.get("image_px") or run_cfg.model.image_px)
    templates = list(zeroshot_templates(cfg.eval.templates))
    max_templates = int(cfg.eval.get("max_templates") or 0)
    if max_templates:
        templates = templates[:max_templates]
        log.warning("%s: eval.max_templates=%d: zero-shot head of the first %d of the %s templates (a rehearsal "
                    "setting, not the paper's head)", run_dir.name, max_templates, len(templates), cfg.eval.templates)
    batch_size = int(cfg.eval.batch_size)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    device = _device(cfg)
    tasks = [task_name(d) for d in task_domains(meta)]
    head = {"model_kind": kind, "classes": classes, "templates": templates if text_head else []}
    imagenet_root, imagenet_samples = cfg.eval.get("imagenet_val_root"), None
    if imagenet_root and not text_head:
        # Its ImageNet classes that map to DomainNet were trained on one shared DomainNet column (e.g. 118 dog
        # breeds on "dog"), so a 1000-way ImageNet accuracy is not defined for it.
        log.warning("%s: %s run, skipping imagenet-val (no 1000-way ImageNet head)", run_dir.name, kind)
    elif imagenet_root:
        imagenet_samples = imagenet_val_samples(imagenet_root)  # a wrong folder fails before any work
        tasks.append(IMAGENET_TASK)
        head["imagenet_classes"] = imagenet_classnames()
    tracker = EvalTracker(cfg, run_dir, meta)  # checks logger.* before any work

    eval_dir = rundir.eval_dir(run_dir)
    rundir.output_path(run_dir, 0).parent.mkdir(parents=True, exist_ok=True)
    results_path = rundir.results_path(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise ClipgenError(f"no checkpoints/epoch_*.pt in {run_dir}: expected at least the untrained epoch_000.pt")

    n_new, eval_sha = 0, git_sha()
    with exclusive(eval_dir), tempfile.TemporaryDirectory(prefix=".cache-", dir=eval_dir) as cache, tracker:
        records, truncated = read_results(results_path)
        if truncated:
            log.warning("%s: dropping a truncated last line left by an interrupted evaluation", results_path)
            rewrite_results(results_path, records)
        done = {done_key(r) for r in records}
        _check_head(eval_dir / "zeroshot_head.json", head)

        todo = []
        for epoch, path in checkpoints:
            sha = sha256_file(path)
            missing = [t for t in tasks if (path.name, sha, t) not in done]
            if missing:
                todo.append((epoch, path, sha, missing))
        n_done = len(checkpoints) * len(tasks) - sum(len(m) for *_, m in todo)
        tokens: dict[tuple[str, str], object] = {}  # (model, task family) -> prompts tokenised once per run
        evalset = inset = None  # decoded only when there is something to evaluate
        models: dict = {}  # one model per architecture, reloaded with each checkpoint's weights
        for epoch, path, sha, missing in todo:
            t0 = time.time()
            model, tokenizer, ckpt = load_checkpoint(path, meta, image_px, kind, reuse=models)
            if int(ckpt.get("epoch", epoch)) != epoch:
                raise ClipgenError(f"checkpoint {str(path)!r} records epoch {ckpt.get('epoch')}: expected {epoch} "
                                   "as in its file name")
            name = ckpt["model_name"]
            by_task, sizes, scales = {}, {}, {}
            dn_tasks = [t for t in missing if t != IMAGENET_TASK]
            if dn_tasks:
                evalset = evalset or load_eval_set(run_cfg, meta, meta_path, image_px, Path(cache))
                if text_head and (name, "dn") not in tokens:
                    tokens[(name, "dn")] = tokenize_prompts(tokenizer, classes, templates)
                # Every image of every task is embedded once per checkpoint; tasks are subsets of them.
                out = run_kind.outputs(model, tokenizer, evalset.images, classes, templates, device, batch_size,
                                      tokens.get((name, "dn")))
                if cfg.eval.save_outputs:
                    _save_outputs(rundir.output_path(run_dir, epoch), evalset, out)
                for task in dn_tasks:
                    d, mask = evalset.tasks[task]
                    by_task[task] = lso_metrics(out["logits"][mask], evalset.labels[mask], evalset.domains[mask],
                                                classes, heldout, [d, NATURAL_DOMAIN])
                    sizes[task], scales[task] = int(mask.sum()), out["logit_scale"]
            if IMAGENET_TASK in missing:
                inset = inset or load_imagenet_set(imagenet_root, image_px, Path(cache), imagenet_samples)
                names = head["imagenet_classes"]
                if (name, "in") not in tokens:
                    tokens[(name, "in")] = tokenize_prompts(tokenizer, names, templates)
                iout = run_kind.outputs(model, tokenizer, inset.images, names, templates, device, batch_size,
                                       tokens[(name, "in")])
                if cfg.eval.save_outputs:
                    _save_imagenet_outputs(rundir.output_path(run_dir, epoch, IMAGENET_TASK), inset,
                                           iout["logits"])
                by_task[IMAGENET_TASK] = imagenet_metrics(iout["logits"], inset.labels)
                sizes[IMAGENET_TASK], scales[IMAGENET_TASK] = len(inset.labels), iout["logit_scale"]
            seconds = round(time.time() - t0, 3)
            for task, metrics in by_task.items():
                d = evalset.tasks[task][0] if task != IMAGENET_TASK else None
                rec = {"task": task, "metrics": metrics, "run": meta.get("run_name", run_dir.name),
                       "recipe_id": meta.get("recipe_id"), "recipe_kind": meta.get("recipe_kind"),
                       "manifest_sha256": meta.get("manifest_sha256"), "seed": meta.get("seed"), "test_domain": d,
                       "checkpoint": str(path), "checkpoint_sha256": sha, "epoch": epoch, "step": ckpt.get("step"),
                       "samples_seen": ckpt.get("samples_seen"), "git_sha": meta.get("git_sha"),
                       "eval_git_sha": eval_sha, "model_kind": kind,
                       "eval_config": {"templates": str(cfg.eval.templates), "max_templates": max_templates,
                                       "batch_size": batch_size},
                       "model_name": name, "num_images": sizes[task], "logit_scale": scales[task],
                       "seconds": seconds}
                append_result(results_path, rec)
                records.append(rec)
                n_new += 1
                headline = f"{d}-lso-ood" if d else "imagenet-top1"
                log.info("%s %s epoch %d: %s=%.4f (%d images, %.1fs)", run_dir.name, task, epoch, headline,
                         metrics[headline], sizes[task], seconds)
            tracker.log(epoch, by_task)

    by_task = {t: sorted((r for r in records if r.get("task") == t), key=lambda r: int(r.get("epoch", -1)))
               for t in tasks}
    cols = {task: (f"{d}-lso-ood", f"{d}-lso-id", f"{NATURAL_DOMAIN}-lso-ood")
            for task, d in zip(tasks, task_domains(meta))}
    cols[IMAGENET_TASK] = ("imagenet-top1", "imagenet-top5")
    print(eval_summary(run_dir.name, results_path, n_new, n_done, {t: by_task[t] for t in tasks}, cols))
    main = by_task[tasks[0]]
    return {"run_dir": str(run_dir), "evaluated": n_new, "skipped": n_done, "results": str(results_path),
            "final": main[-1]["metrics"] if main else {}, "tasks": tasks}


def _save_outputs(path: Path, evalset: EvalSet, out: dict) -> None:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, sample_ids=evalset.sample_ids, domains=evalset.domains, labels=evalset.labels,
                        preds=out["preds"].astype(np.int64), logits=out["logits"].astype(np.float16),
                        image_embeddings=out["image_embeddings"].astype(np.float16),
                        logit_scale=np.float32(out["logit_scale"]))
    atomic_write_bytes(path, buf.getvalue())


def _save_imagenet_outputs(path: Path, inset, logits: np.ndarray) -> None:
    import io

    k = min(5, logits.shape[1])
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int16)
    buf = io.BytesIO()
    np.savez_compressed(buf, sample_ids=inset.sample_ids, labels=inset.labels, top5=top5)
    atomic_write_bytes(path, buf.getvalue())


def _value(record: dict, metric: str) -> str:
    v = record["metrics"].get(metric)
    return f"{v:.4f}" if isinstance(v, (int, float)) else "–"  # None: the task has no such images


def eval_summary(run: str, results_path: Path, n_new: int, n_done: int, by_task: dict[str, list[dict]],
                 cols: dict[str, tuple[str, ...]]) -> str:
    """A few lines for the terminal: what was evaluated and, per task, the final checkpoint's headline metrics
    next to the untrained model's first one (every epoch is in results.jsonl and the report)."""
    lines = [f"{run}: {n_new} evaluations new, {n_done} already done -> {results_path}"]
    width = max(len(t) for t in by_task) if by_task else 0
    for task, records in by_task.items():
        if not records:
            lines.append(f"  {task.ljust(width)}  no results")
            continue
        last, first = records[-1], records[0]
        vals = "  ".join(f"{c} {_value(last, c)}" for c in cols[task])
        start = f"  (epoch {int(first['epoch'])}: {_value(first, cols[task][0])})" if len(records) > 1 else ""
        lines.append(f"  {task.ljust(width)}  epoch {int(last['epoch'])}: {vals}{start}")
    return "\n".join(lines)
