"""A run's identity and its directory name: runs are identified by their settings.

Two runs share a directory only when every setting that changes the result is equal: the recipe (its id), the
model, the training settings (``train_spec``: trainer and optimiser values that change the weights) and the data
settings that a recipe id does not spell (held-out classes, caption seed, validation carve-out, image format,
the synthetic world's spec). The directory name is readable and a pure function of those settings:

    {recipe_id}--{model}[-supervised][--{settings}]--seed{seed}

``{settings}`` is empty for the defaults (the schema's values, or the supervised presets' for the supervised
baseline); otherwise it lists the headline settings that differ (``ep5-lr0.0003``) and, when anything else
differs, ``x`` + a short hash of exactly those other differences (``x3fa2c1``). The seed is always last, so the
seeds of one configuration share everything before ``--seed`` (the report averages over them, W&B names them
alike). ``meta.json["identity"]`` records the full spec.

Run directories of the earlier layout (``{recipe_id}--{model}--seed{seed}`` whatever the settings) are still
found: when the new name does not exist yet and the old one holds a run with the same settings, that directory is
used.
"""
from __future__ import annotations

import functools
import json
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipgen import layout
from clipgen.utils import stable_hash

# Headline settings shown in a run name when they differ from the defaults, in this order.
READABLE = (("trainer.epochs", "ep"), ("trainer.batch_size", "bs"), ("optim.lr", "lr"),
            ("optim.weight_decay", "wd"), ("optim.warmup_steps", "wu"), ("trainer.accum_steps", "acc"))
SEED_SEP = "--seed"


def train_spec(cfg: DictConfig) -> dict:
    """The training settings that determine a run's weights: a run directory is only resumed with the same ones."""
    return {"model.name": cfg.model.name, "model.image_px": int(cfg.model.image_px),
            "trainer.seed": int(cfg.trainer.seed), "trainer.epochs": int(cfg.trainer.epochs),
            "trainer.batch_size": int(cfg.trainer.batch_size), "trainer.objective": str(cfg.trainer.objective),
            "trainer.accum_steps": int(cfg.trainer.accum_steps),
            **{f"optim.{k}": v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items()}}


def data_spec(cfg: DictConfig) -> dict:
    """Data settings that change a run's training data but are not spelled by its recipe id."""
    out = {"heldout.classes": sorted(str(c) for c in cfg.heldout.classes),
           "recipe.caption_seed": int(cfg.recipe.caption_seed), "recipe.image_format": str(cfg.recipe.image_format),
           "data.val_fraction": float(cfg.data.val_fraction), "data.val_seed": int(cfg.data.val_seed),
           "data.use_imagenet_sketch": bool(cfg.data.use_imagenet_sketch)}
    if cfg.data.source == "world" or cfg.data.base == "world":
        out["world"] = stable_hash(layout.world_spec(cfg), 10)
    return out


@functools.lru_cache(maxsize=None)
def _default_values(objective: str) -> dict:
    """The values a setting has when nobody chose it: the schema's, with the supervised presets' trainer and
    optimiser values for the supervised baseline (read from the same YAML files Hydra composes), and the default
    world and held-out set."""
    from clipgen.config import Config, OptimConfig, TrainerConfig

    conf = Path(__file__).parent / "conf"
    trainer = {f.name: getattr(TrainerConfig(), f.name) for f in fields(TrainerConfig)}
    optim = {f.name: getattr(OptimConfig(), f.name) for f in fields(OptimConfig)}
    if objective == "supervised":
        trainer.update(OmegaConf.to_container(OmegaConf.load(conf / "trainer" / "supervised.yaml"))["trainer"])
        optim.update({k: v for k, v in OmegaConf.to_container(OmegaConf.load(conf / "optim" / "sgd_step.yaml")).items()
                      if k != "defaults"})
    base = OmegaConf.structured(Config)
    with_groups = OmegaConf.merge(base, {"world": OmegaConf.load(conf / "world" / "default.yaml"),
                                         "heldout": OmegaConf.load(conf / "heldout" / "paper.yaml"),
                                         "recipe": {"kind": "cg_high"}, "data": {"source": "world", "base": "world"}})
    out = {f"trainer.{k}": v for k, v in trainer.items()}
    out.update({f"optim.{k}": v for k, v in optim.items()})
    out.update(data_spec(with_groups))
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def settings_label(spec: dict, data: dict | None = None) -> str:
    """The ``{settings}`` part of a run name (empty for the defaults); see the module docstring."""
    objective = str(spec.get("trainer.objective", "clip"))
    defaults = _default_values(objective)
    tokens, other = [], {}
    readable = dict(READABLE)
    for key, value in {**spec, **(data or {})}.items():
        if key in ("trainer.seed", "model.name", "trainer.objective", "model.image_px") or key not in defaults:
            continue  # seed, model and objective are spelled elsewhere; the image size is the model's own
        if key in readable:
            continue
        if not _same(value, defaults[key]):
            other[key] = value
    for key, short in READABLE:
        if key in spec and not _same(spec[key], defaults[key]):
            tokens.append(f"{short}{_fmt(spec[key])}")
    if other:
        tokens.append("x" + stable_hash(other, 6))
    return "-".join(tokens)


def identity(cfg: DictConfig) -> dict:
    """Everything that identifies the run the config names (recorded in ``meta.json["identity"]``)."""
    spec, data = train_spec(cfg), data_spec(cfg)
    return {"train_spec": spec, "data": data, "settings": settings_label(spec, data)}


def model_part(cfg: DictConfig) -> str:
    model = str(cfg.model.name)
    if OmegaConf.select(cfg, "trainer.objective", default="clip") == "supervised":
        model += "-supervised"  # the baseline never shares a directory with the CLIP run of the same recipe
    return model


def run_name(cfg: DictConfig, recipe_id: str) -> str:
    """The run directory name for this config (``run_name=...`` wins)."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    label = identity(cfg)["settings"]
    middle = f"--{label}" if label else ""
    return f"{recipe_id}--{model_part(cfg)}{middle}{SEED_SEP}{cfg.trainer.seed}"


def legacy_run_name(cfg: DictConfig, recipe_id: str) -> str:
    """The name the earlier layout gave every run of this recipe, model and seed, whatever its settings."""
    return f"{recipe_id}--{model_part(cfg)}{SEED_SEP}{cfg.trainer.seed}"


def spec_defaults() -> dict:
    """What a training setting was before it became part of ``train_spec``: its schema default."""
    from clipgen.config import OptimConfig, TrainerConfig

    out = {}
    for prefix, cls in (("trainer", TrainerConfig), ("optim", OptimConfig)):
        inst = cls()
        out.update({f"{prefix}.{f.name}": getattr(inst, f.name) for f in fields(cls)})
    return out


def spec_differences(old_spec: dict, spec: dict) -> list[str]:
    """``key=old (now new)`` for every training setting that differs (missing old keys = their default)."""
    defaults = spec_defaults()
    return [f"{k}={old_spec.get(k, defaults.get(k))!r} (now {v!r})" for k, v in spec.items()
            if old_spec.get(k, defaults.get(k)) != v]


def read_meta(run_dir: Path) -> dict | None:
    """A run directory's meta.json, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_dir(cfg: DictConfig, recipe_id: str) -> Path:
    """The directory of the run this config names: by its settings, or the earlier layout's directory when that
    one holds a run with the same settings and the new name is not taken yet."""
    root = layout.runs_root(cfg)
    path = root / run_name(cfg, recipe_id)
    if cfg.get("run_name") or path.exists():
        return path
    old = root / legacy_run_name(cfg, recipe_id)
    if old != path:
        meta = read_meta(old)
        if meta and "train_spec" in meta and not spec_differences(meta["train_spec"], train_spec(cfg)):
            data = (meta.get("identity") or {}).get("data")
            if data is None or data == data_spec(cfg):
                return old
    return path


def seedless(name: str) -> str:
    """A run name without its ``--seed{n}`` suffix: what the seeds of one configuration share."""
    head, sep, tail = str(name).rpartition(SEED_SEP)
    return head if sep and tail.isdigit() else str(name)


def settings_part(name: str) -> str:
    """The settings part of a run name (``""`` for the defaults or a name not made by :func:`run_name`)."""
    parts = seedless(name).split("--")
    return parts[2] if len(parts) == 3 else ""


def settings_of(meta: dict) -> str:
    """The settings label of a run from its meta.json (runs of the earlier layout: from their train_spec)."""
    ident = meta.get("identity") or {}
    if "settings" in ident:
        return str(ident["settings"])
    return settings_label(meta["train_spec"]) if meta.get("train_spec") else ""
