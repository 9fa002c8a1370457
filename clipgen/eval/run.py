"""``run_eval(cfg)``: evaluation of every checkpoint of one run (protocol §6, §9).

Task ``domainnet-{D}``: the test split of real and the run's test domain D, classified over all of the run's
classes (``meta["classes"]``; label = index in that list); a natural-only run gets one task per test domain.
With ``eval.imagenet_val_root`` a CLIP run also gets ``imagenet-val`` (1000-way, open_clip's class names, the
same templates). Images are decoded once, every checkpoint embeds them once, text is tokenised once per run.
``meta.json["model_kind"]`` picks the head: CLIP's zero-shot head, or the supervised baseline's DomainNet columns
(clipgen.models.kinds); the metric keys are the same.

    {run}/eval/results.jsonl         one line per (checkpoint, task), appended + fsynced; finished pairs skipped
                                     (clipgen.eval.results)
    {run}/eval/outputs/epoch_NNN.npz the checkpoint's predictions, logits and image embeddings
                                     (clipgen.eval.outputs, which also writes the imagenet-val ones)
    {run}/eval/zeroshot_head.json    the head's class names and templates (results never mix two heads)

With ``logger.backend=wandb`` each new checkpoint's metrics also go to the training run's W&B run as
``eval/<task>/<metric>`` over ``eval/epoch`` (clipgen.eval.tracking).
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipgen import rundir
from clipgen.errors import ClipgenError
from clipgen.eval import outputs
from clipgen.eval.results import append_result, done_key, exclusive, rewrite_results
from clipgen.rundir import read_results
from clipgen.eval.testsets import (IMAGENET_TASK, EvalSet, imagenet_classnames, imagenet_val_samples, load_eval_set,
                                   load_imagenet_set, task_domains, task_name)
from clipgen.facts import NATURAL_DOMAIN, zeroshot_templates
from clipgen.models.kinds import kind_for, load_checkpoint, model_kind
from clipgen.files import atomic_write_json, read_json
from clipgen.hashing import sha256_file
from clipgen.procs import torch_threads
from clipgen.provenance import git_sha

log = logging.getLogger("clipgen.eval")


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
    """``eval.run_dir`` if set, else the run the config names: its directory, meta.json path and meta, config."""
    from clipgen.recipes.naming import recipe_spec

    run_dir = rundir.resolve_run_dir(cfg, cfg.eval.get("run_dir"), "eval.run_dir", recipe_spec(cfg.recipe).recipe_id)
    meta, meta_path = read_run_meta(run_dir)
    bad = [c for c in meta["heldout_classes"] if c not in meta["classes"]]
    if bad:
        raise ClipgenError(f"{meta_path} heldout_classes {bad} are not in its classes: expected the held-out "
                           "classes to be among the classes")
    return run_dir, meta_path, meta, OmegaConf.load(rundir.config_path(run_dir))


# --- one checkpoint --------------------------------------------------------------------------------------------
def evaluate_checkpoint(model, tokenizer, run_kind, evalset: EvalSet, classes: list[str], heldout: list[str],
                        templates: list[str], tasks: list[str], device: str = "cpu", batch_size: int = 512,
                        tokens=None) -> tuple[dict[str, dict], dict]:
    """The DomainNet tasks ``tasks`` of one loaded checkpoint: ``({task: metrics}, outputs)``. Every image of
    ``evalset`` is embedded once and classified over ``classes`` by the run kind's head (CLIP's zero-shot head over
    ``templates``, or the supervised baseline's columns); each task's metrics (clipgen.eval.metrics.lso_metrics
    for its test domain and real) come from its mask over those outputs, which are what clipgen.eval.outputs
    keeps: ``{"logits", "preds", "image_embeddings", "logit_scale"}``."""
    from clipgen.eval.metrics import lso_metrics

    out = run_kind.outputs(model, tokenizer, evalset.images, classes, templates, device, batch_size, tokens)
    metrics = {}
    for task in tasks:
        d, mask = evalset.tasks[task]
        metrics[task] = lso_metrics(out["logits"][mask], evalset.labels[mask], evalset.domains[mask], classes,
                                    heldout, [d, NATURAL_DOMAIN])
    return metrics, out


# --- the stage -----------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """What run_eval resolved before evaluating: the run, its head, its tasks and settings."""
    run_dir: Path
    meta_path: Path
    meta: dict
    run_cfg: DictConfig
    kind: str
    run_kind: object
    classes: list[str]
    heldout: list[str]
    image_px: int
    templates: list[str]
    max_templates: int
    batch_size: int
    device: str
    tasks: list[str]
    head: dict
    imagenet_root: str | None = None
    imagenet_samples: list | None = None


def _job(cfg: DictConfig) -> _Job:
    run_dir, meta_path, meta, run_cfg = _load_run(cfg)
    kind = model_kind(meta, meta_path)
    run_kind = kind_for(kind)
    templates = list(zeroshot_templates(cfg.eval.templates))
    max_templates = int(cfg.eval.get("max_templates") or 0)
    if max_templates:
        templates = templates[:max_templates]
        log.warning("%s: eval.max_templates=%d: zero-shot head of the first %d of the %s templates (a rehearsal "
                    "setting, not the paper's head)", run_dir.name, max_templates, len(templates), cfg.eval.templates)
    job = _Job(run_dir=run_dir, meta_path=meta_path, meta=meta, run_cfg=run_cfg, kind=kind, run_kind=run_kind,
               classes=list(meta["classes"]), heldout=list(meta["heldout_classes"]),
               image_px=int(meta.get("image_px") or run_cfg.model.image_px), templates=templates,
               max_templates=max_templates, batch_size=int(cfg.eval.batch_size), device=_device(cfg),
               tasks=[task_name(d) for d in task_domains(meta)], head={})
    job.head = {"model_kind": kind, "classes": job.classes, "templates": templates if run_kind.text_head else []}
    root = cfg.eval.get("imagenet_val_root")
    if root and not run_kind.text_head:
        # Its ImageNet classes that map to DomainNet were trained on one shared DomainNet column (e.g. 118 dog
        # breeds on "dog"), so a 1000-way ImageNet accuracy is not defined for it.
        log.warning("%s: %s run, skipping imagenet-val (no 1000-way ImageNet head)", run_dir.name, kind)
    elif root:
        job.imagenet_root, job.imagenet_samples = root, imagenet_val_samples(root)  # a wrong folder fails first
        job.tasks.append(IMAGENET_TASK)
        job.head["imagenet_classes"] = imagenet_classnames()
    return job


def _todo(job: _Job, done: set) -> list[tuple[int, Path, str, list[str]]]:
    """(epoch, checkpoint, its sha256, the tasks it still lacks) of every checkpoint with something to do."""
    checkpoints = rundir.checkpoints(job.run_dir)
    if not checkpoints:
        raise ClipgenError(f"no checkpoints/epoch_*.pt in {job.run_dir}: expected at least the untrained "
                           "epoch_000.pt")
    todo = []
    for epoch, path in checkpoints:
        sha = sha256_file(path)
        missing = [t for t in job.tasks if (path.name, sha, t) not in done]
        if missing:
            todo.append((epoch, path, sha, missing))
    return todo


class _Inputs:
    """The test sets (decoded on first need, once), tokenised prompts and models, shared by every checkpoint."""

    def __init__(self, job: _Job, cache: Path):
        self.job, self.cache = job, cache
        self.evalset = self.inset = None
        self.tokens: dict[tuple[str, str], object] = {}  # (model, task family) -> prompts tokenised once per run
        self.models: dict = {}  # one model per architecture, reloaded with each checkpoint's weights

    def domainnet(self) -> EvalSet:
        j = self.job
        self.evalset = self.evalset or load_eval_set(j.run_cfg, j.meta, j.meta_path, j.image_px, self.cache)
        return self.evalset

    def imagenet(self):
        j = self.job
        self.inset = self.inset or load_imagenet_set(j.imagenet_root, j.image_px, self.cache, j.imagenet_samples)
        return self.inset

    def prompts(self, name: str, family: str, tokenizer, classnames: list[str]):
        from clipgen.models.zeroshot import tokenize_prompts

        if self.job.run_kind.text_head and (name, family) not in self.tokens:
            self.tokens[(name, family)] = tokenize_prompts(tokenizer, classnames, self.job.templates)
        return self.tokens.get((name, family))


def _evaluate(job: _Job, inputs: _Inputs, epoch: int, path: Path, missing: list[str], save: bool):
    """One checkpoint's missing tasks: ``(ckpt, {task: metrics}, {task: images}, {task: logit_scale})``; its
    outputs saved when ``save``."""
    from clipgen.eval.testsets import imagenet_metrics

    model, tokenizer, ckpt = load_checkpoint(path, job.meta, job.image_px, job.kind, reuse=inputs.models)
    if int(ckpt.get("epoch", epoch)) != epoch:
        raise ClipgenError(f"checkpoint {str(path)!r} records epoch {ckpt.get('epoch')}: expected {epoch} as in "
                           "its file name")
    name, by_task, sizes, scales = ckpt["model_name"], {}, {}, {}
    dn_tasks = [t for t in missing if t != IMAGENET_TASK]
    if dn_tasks:
        es = inputs.domainnet()
        by_task, out = evaluate_checkpoint(model, tokenizer, job.run_kind, es, job.classes, job.heldout,
                                           job.templates, dn_tasks, job.device, job.batch_size,
                                           inputs.prompts(name, "dn", tokenizer, job.classes))
        if save:
            outputs.save(rundir.output_path(job.run_dir, epoch), es.sample_ids, es.domains, es.labels, **out)
        for task in dn_tasks:
            sizes[task], scales[task] = int(es.tasks[task][1].sum()), out["logit_scale"]
    if IMAGENET_TASK in missing:
        inset, names = inputs.imagenet(), job.head["imagenet_classes"]
        iout = job.run_kind.outputs(model, tokenizer, inset.images, names, job.templates, job.device,
                                    job.batch_size, inputs.prompts(name, "in", tokenizer, names))
        if save:
            outputs.save_imagenet(rundir.output_path(job.run_dir, epoch, IMAGENET_TASK), inset.sample_ids,
                                  inset.labels, iout["logits"])
        by_task[IMAGENET_TASK] = imagenet_metrics(iout["logits"], inset.labels)
        sizes[IMAGENET_TASK], scales[IMAGENET_TASK] = len(inset.labels), iout["logit_scale"]
    return ckpt, by_task, sizes, scales


def _record(job: _Job, cfg: DictConfig, task: str, metrics: dict, path: Path, sha: str, epoch: int, ckpt: dict,
            size: int, scale: float, seconds: float, eval_sha: str | None, test_domain: str | None) -> dict:
    """One line of results.jsonl, with its provenance (protocol §6)."""
    meta = job.meta
    return {"task": task, "metrics": metrics, "run": meta.get("run_name", job.run_dir.name),
            "recipe_id": meta.get("recipe_id"), "recipe_kind": meta.get("recipe_kind"),
            "manifest_sha256": meta.get("manifest_sha256"), "seed": meta.get("seed"), "test_domain": test_domain,
            "checkpoint": str(path), "checkpoint_sha256": sha, "epoch": epoch, "step": ckpt.get("step"),
            "samples_seen": ckpt.get("samples_seen"), "git_sha": meta.get("git_sha"), "eval_git_sha": eval_sha,
            "model_kind": job.kind,
            "eval_config": {"templates": str(cfg.eval.templates), "max_templates": job.max_templates,
                            "batch_size": job.batch_size},
            "model_name": ckpt["model_name"], "num_images": size, "logit_scale": scale, "seconds": seconds}


def run_eval(cfg: DictConfig) -> dict:
    """Evaluate every checkpoint of a run on its task(s); see the module docstring for outputs."""
    from clipgen.eval.tracking import EvalTracker
    from clipgen.preflight import check_values

    check_values(cfg)  # trainer.seed=-1 would look for a run "--seed-1"; eval.batch_size=0 fails in torch
    job = _job(cfg)
    tracker = EvalTracker(cfg, job.run_dir, job.meta)  # checks logger.* before any work
    eval_dir, results_path = rundir.eval_dir(job.run_dir), rundir.results_path(job.run_dir)
    rundir.output_path(job.run_dir, 0).parent.mkdir(parents=True, exist_ok=True)
    n_new, eval_sha = 0, git_sha()
    with torch_threads(int(cfg.trainer.threads)), exclusive(eval_dir), \
            tempfile.TemporaryDirectory(prefix=".cache-", dir=eval_dir) as cache, tracker:
        records = _read_records(results_path)
        _check_head(rundir.head_path(job.run_dir), job.head)
        todo = _todo(job, {done_key(r) for r in records})
        n_done = len(rundir.checkpoints(job.run_dir)) * len(job.tasks) - sum(len(m) for *_, m in todo)
        inputs = _Inputs(job, Path(cache))
        for epoch, path, sha, missing in todo:
            t0 = time.time()
            ckpt, by_task, sizes, scales = _evaluate(job, inputs, epoch, path, missing, bool(cfg.eval.save_outputs))
            seconds = round(time.time() - t0, 3)
            for task, metrics in by_task.items():
                d = inputs.evalset.tasks[task][0] if task != IMAGENET_TASK else None
                rec = _record(job, cfg, task, metrics, path, sha, epoch, ckpt, sizes[task], scales[task], seconds,
                              eval_sha, d)
                append_result(results_path, rec)
                records.append(rec)
                n_new += 1
                headline = f"{d}-lso-ood" if d else "imagenet-top1"
                log.info("%s %s epoch %d: %s=%.4f (%d images, %.1fs)", job.run_dir.name, task, epoch, headline,
                         metrics[headline], sizes[task], seconds)
            tracker.log(epoch, by_task)
    return _summary(job, results_path, records, n_new, n_done)


def _read_records(results_path: Path) -> list[dict]:
    records, truncated = read_results(results_path)
    if truncated:
        log.warning("%s: dropping a truncated last line left by an interrupted evaluation", results_path)
        rewrite_results(results_path, records)
    return records


def _summary(job: _Job, results_path: Path, records: list[dict], n_new: int, n_done: int) -> dict:
    """Print the run's summary; the stage's result."""
    by_task = {t: sorted((r for r in records if r.get("task") == t), key=lambda r: int(r.get("epoch", -1)))
               for t in job.tasks}
    cols = {task: (f"{d}-lso-ood", f"{d}-lso-id", f"{NATURAL_DOMAIN}-lso-ood")
            for task, d in zip(job.tasks, task_domains(job.meta))}
    cols[IMAGENET_TASK] = ("imagenet-top1", "imagenet-top5")
    print(eval_summary(job.run_dir.name, results_path, n_new, n_done, by_task, cols))
    main = by_task[job.tasks[0]]
    return {"run_dir": str(job.run_dir), "evaluated": n_new, "skipped": n_done, "results": str(results_path),
            "final": main[-1]["metrics"] if main else {}, "tasks": job.tasks}


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
