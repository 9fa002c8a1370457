"""A CLIP run's checkpoint as a folder that plain open_clip loads with no clipgen installed (so do CLIP_benchmark
and any other tool built on open_clip): open_clip's ``local-dir:`` format (open_clip >= 3.3, the format of its
Hugging Face uploads)::

    {run}/export/epoch_NNN/                (or any folder: clipgen-export export.dir=...)
        open_clip_config.json              {"model_cfg": the checkpoint's model config, "preprocess_cfg": ...}
        open_clip_model.safetensors        the checkpoint's state_dict, as stored (fp16 with checkpoint_dtype=fp16)
        clipgen-tiny-bpe.txt.gz            the compact vocabulary (clipgen's tiny models only)
        clipgen_export.json                where it came from: run, epoch, checkpoint path and sha256 (written last)

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/epoch_NNN")
    tokenizer = open_clip.get_tokenizer("local-dir:/path/to/epoch_NNN")

open_clip opens a tokenizer's ``bpe_path`` as given, relative to the working directory and not to the folder, so
the config names the vocabulary copied into the folder by its absolute path: a moved or copied folder needs a
new export (or that one path edited). ``preprocess_cfg`` is clipgen-eval's: shorter side resized to the model's
size (bicubic), centre crop, OpenAI's mean and std, so open_clip's eval transform gives the images clipgen-eval
classifies.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from clipgen.errors import ClipgenError
from clipgen.models.checkpoint import load
from clipgen.files import atomic_write_bytes, atomic_write_json, read_json
from clipgen.hashing import sha256_file

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
PROVENANCE = "clipgen_export.json"


def preprocess_cfg() -> dict:
    """clipgen-eval's image preprocessing in open_clip's terms (clipgen.eval.images.load_image)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def is_current(out_dir: str | Path, checkpoint_sha256: str) -> bool:
    """Whether ``out_dir`` holds a complete export of the checkpoint with this hash whose vocabulary is where its
    config says (a moved folder is exported again)."""
    out_dir = Path(out_dir)
    try:
        done = read_json(out_dir / PROVENANCE)
        cfg = read_json(out_dir / CONFIG)
    except ClipgenError:
        return False
    bpe = (cfg.get("model_cfg", {}).get("text_cfg", {}).get("tokenizer_kwargs") or {}).get("bpe_path")
    return (done.get("checkpoint_sha256") == checkpoint_sha256 and (out_dir / WEIGHTS).is_file()
            and (bpe is None or Path(bpe).is_file()))


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, provenance: dict | None = None) -> dict:
    """Write the ``local-dir:`` folder of one CLIP epoch checkpoint (module docstring); a folder that already
    holds it is left alone. Returns ``{"dir", "written", "bytes"}``."""
    from safetensors.torch import save as safetensors_bytes

    checkpoint, out_dir = Path(checkpoint), Path(out_dir).resolve()
    sha = sha256_file(checkpoint)
    if is_current(out_dir, sha):
        return {"dir": str(out_dir), "written": False, "bytes": _size(out_dir)}
    ckpt = load(checkpoint)
    if ckpt.get("kind", "clip") != "clip":
        raise ClipgenError(f"checkpoint {str(checkpoint)!r} is a {ckpt['kind']} model: open_clip loads CLIP "
                           "models only (a supervised baseline has no text tower)")
    model_cfg = json.loads(json.dumps(ckpt["model_cfg"]))  # a copy; the checkpoint's stays as shipped
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = model_cfg.get("text_cfg", {}).get("tokenizer_kwargs") or {}
    if "bpe_path" in kwargs:  # a vocabulary of clipgen's: shipped under this file name (clipgen.models.vocab)
        name = os.path.basename(kwargs["bpe_path"])
        source = resources.files("clipgen.resources").joinpath(name)
        if not source.is_file():
            raise ClipgenError(f"checkpoint {str(checkpoint)!r} names the vocabulary {name!r}, which clipgen does "
                               "not ship: expected one of clipgen/resources' vocabularies")
        atomic_write_bytes(out_dir / name, source.read_bytes())
        kwargs["bpe_path"] = str(out_dir / name)
    state = {k: v.contiguous() for k, v in ckpt["state_dict"].items()}
    atomic_write_bytes(out_dir / WEIGHTS, safetensors_bytes(state))
    atomic_write_json(out_dir / CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg()})
    atomic_write_json(out_dir / PROVENANCE, {
        **(provenance or {}), "model_name": ckpt.get("model_name"), "epoch": ckpt.get("epoch"),
        "step": ckpt.get("step"), "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha,
        "load": f"open_clip.create_model_and_transforms('local-dir:{out_dir}'); "
                f"open_clip.get_tokenizer('local-dir:{out_dir}')"})
    return {"dir": str(out_dir), "written": True, "bytes": _size(out_dir)}


def _size(out_dir: Path) -> int:
    return sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
