"""A cheap zero-shot evaluation at every epoch end, from inside the trainer (``eval.during_training=true``).

It classifies a fixed subset of the run's test task(s) (at most ``eval.subset_per_class`` images per class and
domain, picked by a stable hash of the sample ids: clipgen.eval.testsets.subset_indices) with the zero-shot head
and logs ``eval/<task>-subset/<metric>`` against ``eval/epoch`` into the training run's W&B run, so a researcher
sees the held-out accuracy move while the run trains. The ``-subset`` suffix keeps these numbers apart from the
full evaluation's ``eval/<task>/<metric>``. Nothing goes to ``eval/results.jsonl``: ``clipgen-eval`` over every
checkpoint stays the source of truth.

It must not change training: it runs under ``torch.no_grad`` with the model in eval mode (BatchNorm statistics
untouched), puts the previous train/eval mode back, and restores every RNG state it could touch (torch CPU and
CUDA, numpy, Python), so a run with it on ends bit for bit where a run without it does. Call it from the training
process only (rank 0 once training is distributed).
"""
from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager

import numpy as np
from omegaconf import DictConfig

from clipgen.errors import ClipgenError
from clipgen.facts import NATURAL_DOMAIN

log = logging.getLogger("clipgen.eval")


@contextmanager
def preserved_state(model):
    """Run a block without leaving a trace on training: RNG states and the model's train/eval mode come back."""
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    np_rng, py_rng = np.random.get_state(), random.getstate()
    was_training = model.training
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


class SubsetEvaluator:
    """Call ``evaluator(model, epoch=..., step=..., logger=...)`` at an epoch end; returns ``{task: metrics}``.
    The images are decoded and the prompts tokenised at the first call and reused for every later epoch."""

    def __init__(self, cfg: DictConfig, manifest: dict, tokenizer, image_px: int):
        from clipgen.facts import zeroshot_templates

        per_class = int(cfg.eval.subset_per_class)
        if per_class < 1:
            raise ClipgenError(f"eval.subset_per_class={per_class}: expected a positive number of images per "
                               "class and domain")
        for key in ("classes", "heldout_classes", "test_domain"):
            if manifest.get(key) is None:
                raise ClipgenError(f"recipe manifest has no {key!r}: eval.during_training needs the recipe's "
                                   "classes, held-out classes and test domain (clipgen/FORMATS.md)")
        self.cfg, self.tokenizer, self.image_px, self.per_class = cfg, tokenizer, int(image_px), per_class
        # The recipe manifest carries what run_eval reads from meta.json.
        self.meta = {"classes": list(manifest["classes"]), "heldout_classes": list(manifest["heldout_classes"]),
                     "test_domain": manifest["test_domain"], "recipe_kind": manifest.get("kind")}
        self.templates = list(zeroshot_templates(cfg.eval.templates))
        self.batch_size = int(cfg.eval.batch_size)
        self.evalset = self.tokens = None
        self._axis_defined = False

    def _prepare(self) -> None:
        from clipgen.eval.testsets import load_eval_set
        from clipgen.models.zeroshot import tokenize_prompts

        self.evalset = load_eval_set(self.cfg, self.meta, "recipe manifest", self.image_px,
                                     per_group=self.per_class)
        self.tokens = tokenize_prompts(self.tokenizer, self.meta["classes"], self.templates)

    def __call__(self, model, *, epoch: int, step: int, logger=None) -> dict:
        from clipgen.eval.metrics import lso_metrics
        from clipgen.eval.tracking import define_eval_axis, eval_keys
        from clipgen.models.checkpoint import unwrap
        from clipgen.models.zeroshot import clip_outputs

        t0 = time.time()
        bare = unwrap(model)
        device = next(bare.parameters()).device
        with preserved_state(model):
            if self.evalset is None:
                self._prepare()
            out = clip_outputs(bare, self.tokenizer, self.evalset.images, self.meta["classes"], self.templates,
                               device, self.batch_size, self.tokens)
        es, classes, heldout = self.evalset, self.meta["classes"], self.meta["heldout_classes"]
        by_task = {}
        for task, (d, mask) in es.tasks.items():
            by_task[task] = lso_metrics(out["logits"][mask], es.labels[mask], es.domains[mask], classes, heldout,
                                        [d, NATURAL_DOMAIN])
        row = {"eval/epoch": int(epoch)}
        for task, metrics in by_task.items():
            row.update(eval_keys(f"{task}-subset", metrics))
        run = getattr(logger, "run", None)
        if run is not None and not self._axis_defined:
            define_eval_axis(run)
            self._axis_defined = True
        if logger is not None:
            logger.log(row, step=step)
        first, (d, mask) = next(iter(by_task)), next(iter(es.tasks.values()))
        log.info("epoch %d subset eval (%d images, %.1fs): %s %s-lso-ood=%.4f %s-lso-id=%.4f", epoch, int(mask.sum()),
                 time.time() - t0, first, d, by_task[first][f"{d}-lso-ood"], d, by_task[first][f"{d}-lso-id"])
        return by_task


def subset_evaluator(cfg: DictConfig, manifest: dict, tokenizer) -> SubsetEvaluator | None:
    """The trainer's hook: a :class:`SubsetEvaluator` when ``eval.during_training`` is on, else None."""
    if not cfg.eval.get("during_training", False):
        return None
    return SubsetEvaluator(cfg, manifest, tokenizer, int(cfg.model.image_px))
