"""CLIP's zero-shot head as pure functions: how a CLIP model turns images into scores over class names (protocol
§6). Every class name is put into every template, the normalised text embeddings of one class are averaged and
the mean renormalised; an image is assigned the class of highest cosine similarity. Evaluation
(clipgen.eval), the trainer's per-epoch subset evaluation and the analyses all score models through it.

Images travel as uint8 ``[n, 3, px, px]`` arrays (resized and centre-cropped once, like open_clip's eval
transform) and are normalised per batch, so a decoded test set costs a quarter of its float32 size and can be
reused for every checkpoint of a run.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from clipgen.errors import ClipgenError

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD, which its eval transform uses for every model we train.
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


# --- images --------------------------------------------------------------------------------------------------
def normalize_images(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``[b, 3, h, w]`` -> float32 normalised with OpenAI's mean/std (what open_clip's transform gives)."""
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def as_batch(images, start: int, batch_size: int, device) -> torch.Tensor:
    """``images[start:start + batch_size]`` on ``device``, normalised: uint8 images (array or tensor) are
    normalised here, float tensors are taken as already normalised."""
    batch = images[start:start + batch_size]
    batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    batch = batch.to(device)
    return normalize_images(batch) if batch.dtype == torch.uint8 else batch


# --- text side -----------------------------------------------------------------------------------------------
def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major (class 0's templates first)."""
    return [t.format(c) for c in classnames for t in templates]


def tokenize_prompts(tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Token ids ``[num_classes * num_templates, context]``; tokenising is the slow part for 345 x 86 prompts,
    so callers evaluating many checkpoints do it once and pass ``tokens`` to :func:`class_embeddings`."""
    if not classnames or not templates:
        raise ClipgenError(f"zero-shot head needs class names and templates, got {len(classnames)} classes and "
                           f"{len(templates)} templates")
    return tokenizer(prompts(classnames, templates))


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                     device: str | torch.device = "cpu", batch_size: int = 512,
                     tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-shot classifier weights ``[num_classes, embed]`` (float32, on ``device``): per class the mean of its
    normalised template embeddings, renormalised. All class x template prompts are encoded in batches of
    ``batch_size`` regardless of class boundaries."""
    if tokens is None:
        tokens = tokenize_prompts(tokenizer, classnames, templates)
    num_c, num_t = len(classnames), len(templates)
    if tokens.shape[0] != num_c * num_t:
        raise ClipgenError(f"tokens has {tokens.shape[0]} rows: expected {num_c} classes x {num_t} templates")
    model.eval()
    trim = _trimmable(model)
    # Shortest prompts first, so a batch trimmed to its longest prompt wastes little on padding.
    order = torch.argsort(tokens.argmax(dim=-1), stable=True) if trim else torch.arange(tokens.shape[0])
    emb = None
    for start in range(0, tokens.shape[0], batch_size):
        idx = order[start:start + batch_size]
        batch = tokens[idx].to(device)
        out = (encode_text_trimmed(model, batch) if trim else model.encode_text(batch, normalize=True)).float()
        if emb is None:
            emb = torch.empty(tokens.shape[0], out.shape[-1], device=out.device)
        emb[idx.to(out.device)] = out
    text = emb.view(num_c, num_t, -1).mean(dim=1)
    return text / text.norm(dim=-1, keepdim=True)


def _trimmable(model) -> bool:
    """open_clip's own ``CLIP.encode_text`` with a causal mask and end-of-text pooling (every clipgen model):
    then the padding after a prompt's end token cannot change its embedding."""
    from open_clip.model import CLIP

    return (type(model).encode_text is CLIP.encode_text and getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None)


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised ``model.encode_text(tokens)`` computed on the first L positions only, L = the batch's longest
    prompt (its end-of-text token, the largest id, + 1). Exact for :func:`_trimmable` models: the causal mask
    keeps later (padding) positions out of earlier ones, and pooling reads the end-of-text position. CLIP's
    context is 77 tokens and a prompt is ~10-20, so this does a fraction of the text tower's work."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return torch.nn.functional.normalize(x, dim=-1)


# --- image side ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(model, images, device: str | torch.device = "cpu", batch_size: int = 512) -> torch.Tensor:
    """Normalised image embeddings ``[n, embed]`` (float32, on the CPU). ``images`` is uint8 ``[n, 3, h, w]``
    (array or tensor; normalised here per batch) or an already normalised float tensor."""
    model.eval()
    chunks = [model.encode_image(as_batch(images, start, batch_size, device), normalize=True).float().cpu()
              for start in range(0, len(images), batch_size)]
    if not chunks:
        embed_dim = getattr(model, "text_projection", None)
        width = embed_dim.shape[-1] if embed_dim is not None else 0
        return torch.zeros(0, width)
    return torch.cat(chunks)


def zeroshot_logits(image_emb: torch.Tensor, class_emb: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """``logit_scale * cosine`` between every image and every class embedding, ``[n_images, n_classes]``."""
    return logit_scale * image_emb.to(class_emb.device, class_emb.dtype) @ class_emb.T


def model_logit_scale(model) -> float:
    """The model's own temperature (exp of its learned log-scale, capped at 100 as in CLIP), so softmax of the
    stored logits gives the model's probabilities; argmax and accuracies do not depend on it."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        return 100.0
    return float(min(scale.detach().exp().item(), 100.0))


# --- the head's outputs ----------------------------------------------------------------------------------------
def clip_outputs(model, tokenizer, images, classnames: Sequence[str], templates: Sequence[str], device="cpu",
                 batch_size: int = 512, tokens=None) -> dict:
    """The zero-shot head's ``{"logits", "preds", "image_embeddings", "logit_scale"}`` over ``classnames``
    (``tokens``: pre-tokenised prompts, see :func:`tokenize_prompts`)."""
    model = model.to(device)
    class_emb = class_embeddings(model, tokenizer, classnames, templates, device, batch_size, tokens)
    image_emb = encode_images(model, images, device, batch_size)
    scale = model_logit_scale(model)
    logits = zeroshot_logits(image_emb, class_emb, scale).cpu().numpy()
    preds = logits.argmax(axis=1) if len(logits) else np.zeros(0, dtype=np.int64)
    return {"logits": logits, "preds": preds, "image_embeddings": image_emb.numpy(), "logit_scale": scale}
