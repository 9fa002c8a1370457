"""Concept vocabulary for naming the SAE generator's latents (``diff.sae_vocab_file``).

Each word is embedded by each run's own text tower at the diffed epoch, as a zero-shot class is (the mean of its
normalised template embeddings, renormalised; templates of ``eval.templates``), so a latent's decoder direction
in run A's space is named with run A's words and likewise for B (generators/sae.py ``concept_names``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipgen import rundir
from clipgen.diff.records import RunInfo
from clipgen.errors import ClipgenError
from clipgen.hashing import sha256_file


def read_vocab(path) -> list[str]:
    """One concept per line; blank lines and lines starting with '#' are skipped."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ClipgenError(f"diff.sae_vocab_file={str(path)!r} does not exist: expected a text file with one concept "
                           "per line")
    words = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise ClipgenError(f"diff.sae_vocab_file={str(path)!r} holds no concepts: expected one concept per line")
    return words


def _text_embeddings(run: RunInfo, epoch: int, words: list[str], templates: list[str]) -> np.ndarray:
    import torch

    from clipgen.models.kinds import kind_for, load_checkpoint, model_kind
    from clipgen.models.zeroshot import class_embeddings

    ckpt = rundir.checkpoint_path(run.run_dir, epoch)
    if not ckpt.is_file():
        raise ClipgenError(f"{ckpt} does not exist: diff.sae_vocab_file embeds the vocabulary with each run's text "
                           f"tower at the diffed epoch ({epoch}); expected that checkpoint")
    kind = model_kind(run.meta, rundir.meta_path(run.run_dir))
    if not kind_for(kind).text_head:
        raise ClipgenError(f"{run.run_dir}: model_kind {kind!r} has no text tower: diff.sae_vocab_file needs two "
                           "CLIP runs (leave it unset to describe latents by metadata only)")
    model, tok, _ = load_checkpoint(ckpt, run.meta, int(run.meta.get("image_px") or 0) or None, kind)
    with torch.no_grad():
        return class_embeddings(model, tok, words, templates).numpy()


def vocabulary(path, run_a: RunInfo, run_b: RunInfo, epoch: int, template_set: str) -> dict:
    """``{"words", "a", "b", "sha256"}``: the words and their text embeddings in each run's space."""
    from clipgen.facts import zeroshot_templates

    words = read_vocab(path)
    templates = list(zeroshot_templates(template_set))
    return {"words": words, "a": _text_embeddings(run_a, epoch, words, templates),
            "b": _text_embeddings(run_b, epoch, words, templates), "sha256": sha256_file(Path(str(path)).expanduser())}
