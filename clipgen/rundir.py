"""The run directory: its name (a run's identity is its settings), its files, and reading them.

Every stage reaches a run directory through this module; no other module spells its file names:

    {run}/config.yaml                  the composed config the run started with      config_path, read_config
    {run}/meta.json                    what clipgen-train recorded                    meta_path, read_meta, load_meta
    {run}/latest.pt                    the resumable state                            latest_path
    {run}/checkpoints/epoch_NNN.pt     epoch checkpoints (000 = untrained)            checkpoint_path, checkpoints
    {run}/eval/results.jsonl           one line per (checkpoint, task)                results_path, evaluated
    {run}/eval/outputs/epoch_NNN.npz   per-checkpoint predictions, logits, embeddings output_path, outputs
    {run}/analysis/                    clipgen-analyze's results                      analysis_dir
    {run}/export/epoch_NNN/            a checkpoint as open_clip's local-dir: folder  export_dir

Naming: runs are identified by their settings.

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
import re
from dataclasses import fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipgen import layout
from clipgen.errors import ClipgenError
from clipgen.facts import DEFAULT_JPEG_QUALITY, RECIPE_IMAGE_FORMAT, recipe_image_format
from clipgen.hashing import stable_hash

META, CONFIG, LATEST = "meta.json", "config.yaml", "latest.pt"
CHECKPOINTS, EVAL, OUTPUTS, RESULTS, ANALYSIS = "checkpoints", "eval", "outputs", "results.jsonl", "analysis"
HEAD = "zeroshot_head.json"
# What a killed trainer's atomic writes leave behind in a run directory (clipgen.files: ".{name}.<random>.tmp").
TRAINER_TEMP_FILES = (f".{LATEST}.*.tmp", f".{META}.*.tmp", f".{CONFIG}.*.tmp", f"{CHECKPOINTS}/.epoch_*.pt.*.tmp")
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.(pt|npz)$")

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


# Data settings named in a run's ``x`` hash only when they are set (absent from runs that predate them, so their
# names and recorded identities stay what they were).
OPTIONAL_DATA_KEYS = ("recipe.jpeg_quality", "data.cc_shards")


def data_spec(cfg: DictConfig) -> dict:
    """Data settings that change a run's training data but are not spelled by its recipe id."""
    try:
        fmt = recipe_image_format(str(cfg.recipe.image_format), str(cfg.data.source))
    except ValueError as e:
        raise ClipgenError(str(e)) from None
    out = {"heldout.classes": sorted(str(c) for c in cfg.heldout.classes),
           "recipe.caption_seed": int(cfg.recipe.caption_seed), "recipe.image_format": fmt,
           "data.val_fraction": float(cfg.data.val_fraction), "data.val_seed": int(cfg.data.val_seed),
           "data.use_imagenet_sketch": bool(cfg.data.use_imagenet_sketch)}
    if fmt == "jpg" and int(cfg.recipe.jpeg_quality) != DEFAULT_JPEG_QUALITY:
        out["recipe.jpeg_quality"] = int(cfg.recipe.jpeg_quality)
    if cfg.data.source == "world" or cfg.data.base == "world":
        out["world"] = stable_hash(layout.world_spec(cfg), 10)
    if cfg.data.base == "cc":  # the corpus as named (the recipe's directory hashes what its shards hold)
        out["data.cc_shards"] = str(cfg.data.cc_shards)
    return out


@functools.lru_cache(maxsize=None)
def _default_values(objective: str, source: str = "world") -> dict:
    """The values a setting has when nobody chose it: the schema's, with the supervised presets' trainer and
    optimiser values for the supervised baseline (read from the same YAML files Hydra composes), and the default
    world and held-out set; for ``source=domainnet`` the paper presets' data (DomainNet, ImageNet-Captions: JPEG
    recipes, no world)."""
    from clipgen.config import Config, OptimConfig, TrainerConfig

    conf = Path(__file__).parent / "conf"
    trainer = {f.name: getattr(TrainerConfig(), f.name) for f in fields(TrainerConfig)}
    optim = {f.name: getattr(OptimConfig(), f.name) for f in fields(OptimConfig)}
    if objective == "supervised":
        trainer.update(OmegaConf.to_container(OmegaConf.load(conf / "trainer" / "supervised.yaml"))["trainer"])
        optim.update({k: v for k, v in OmegaConf.to_container(OmegaConf.load(conf / "optim" / "sgd_step.yaml")).items()
                      if k != "defaults"})
    base = OmegaConf.structured(Config)
    with_groups = OmegaConf.merge(base, {"model": OmegaConf.load(conf / "model" / "tiny_rn.yaml"),
                                         "world": OmegaConf.load(conf / "world" / "default.yaml"),
                                         "heldout": OmegaConf.load(conf / "heldout" / "paper.yaml"),
                                         "recipe": {"kind": "cg_high"},
                                         "data": {"source": source,
                                                  "base": "world" if source == "world" else "imagenet_captions"}})
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


def settings_label(spec: dict, data: dict | None = None, source: str = "world") -> str:
    """The ``{settings}`` part of a run name (empty for the defaults of ``source``, data.source); see the module
    docstring."""
    objective = str(spec.get("trainer.objective", "clip"))
    defaults = _default_values(objective, source if source in RECIPE_IMAGE_FORMAT else "world")
    tokens, other = [], {}
    readable = dict(READABLE)
    for key, value in {**spec, **(data or {})}.items():
        if key in OPTIONAL_DATA_KEYS:
            other[key] = value
            continue
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
    return {"train_spec": spec, "data": data, "settings": settings_label(spec, data, str(cfg.data.source))}


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


# --- files ---------------------------------------------------------------------------------------------------
def meta_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / META


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def latest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LATEST


def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"epoch_{int(epoch):03d}.pt"


def is_saved_epoch(epoch: int, epochs: int, every: int) -> bool:
    """Whether training writes ``checkpoints/epoch_{epoch}.pt``: the untrained epoch 0, every
    ``trainer.save_every_epochs``-th epoch and the last."""
    return epoch == 0 or epoch % every == 0 or epoch == epochs


def saved_epochs(epochs: int, every: int) -> list[int]:
    """The epochs a finished run of ``epochs`` has checkpoints of."""
    return [e for e in range(epochs + 1) if is_saved_epoch(e, epochs, every)]


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVAL


def export_dir(run_dir: str | Path, epoch: int) -> Path:
    """Where clipgen-export (and clipgen-train, for the last epoch) writes a checkpoint's open_clip folder."""
    return Path(run_dir) / "export" / f"epoch_{int(epoch):03d}"


def results_path(run_dir: str | Path) -> Path:
    return eval_dir(run_dir) / RESULTS


def head_path(run_dir: str | Path) -> Path:
    """The evaluation head's class names and templates (one head per eval directory)."""
    return eval_dir(run_dir) / HEAD


def output_path(run_dir: str | Path, epoch: int, task: str | None = None) -> Path:
    """Evaluation outputs of one checkpoint (``task``: a task with outputs of its own, e.g. imagenet-val)."""
    return eval_dir(run_dir) / OUTPUTS / (f"epoch_{int(epoch):03d}.npz" if task is None else
                                          f"epoch_{int(epoch):03d}.{task}.npz")


def analysis_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ANALYSIS


def _by_epoch(folder: Path, suffix: str) -> list[tuple[int, Path]]:
    found = []
    for p in folder.glob(f"epoch_*.{suffix}"):
        m = _EPOCH_FILE.match(p.name)
        if m and m.group(2) == suffix:
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``checkpoints/epoch_NNN.pt`` in epoch order (numerically, whatever the padding)."""
    return _by_epoch(Path(run_dir) / CHECKPOINTS, "pt")


def outputs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The evaluated checkpoints' ``eval/outputs/epoch_NNN.npz`` in epoch order."""
    return _by_epoch(eval_dir(run_dir) / OUTPUTS, "npz")


def is_run(run_dir: str | Path) -> bool:
    """A directory clipgen-train started (it has meta.json)."""
    return meta_path(run_dir).is_file()


def resolve_run_dir(cfg: DictConfig, explicit: str | None, key: str, recipe_id: str) -> Path:
    """``explicit`` (the value of config key ``key``, e.g. eval.run_dir) if set, else the run the config names
    (``recipe_id``, the config's recipe's, and the model, settings, seed or ``run_name``); one error naming what to
    do when it holds no run."""
    import os

    if explicit:
        path = Path(os.path.expanduser(str(explicit))).resolve()
        todo = f"point {key} at a run directory written by clipgen-train"
    else:
        path = run_dir(cfg, recipe_id)
        todo = (f"train it first (clipgen-train recipe={cfg.recipe.kind} recipe.test_domain={cfg.recipe.test_domain} "
                f"model.name={cfg.model.name} trainer.seed={cfg.trainer.seed} with the same overrides) or set {key}")
    if not path.is_dir():
        raise ClipgenError(f"run directory {str(path)!r} does not exist: {todo}")
    if not is_run(path):
        raise ClipgenError(f"{meta_path(path)} is missing (training never started there): {todo}")
    return path


def read_meta(run_dir: str | Path) -> dict | None:
    """A run directory's meta.json, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(meta_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_meta(run_dir: str | Path, need: tuple[str, ...] = ()) -> dict:
    """A run's meta.json, with a one-line error naming the file when it is missing, unreadable or lacks a key."""
    path = meta_path(run_dir)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipgenError(f"{path} is missing: expected a run directory written by clipgen-train") from None
    except OSError as e:
        raise ClipgenError(f"cannot read {path} ({e.strerror}): expected a readable run meta") from None
    except ValueError as e:
        raise ClipgenError(f"{path} is not valid JSON ({e}): expected the run's meta") from None
    for key in need:
        if key not in meta:
            raise ClipgenError(f"{path} has no {key!r}: expected a meta.json written by clipgen-train")
    return meta


def write_meta(run_dir: str | Path, meta: dict) -> None:
    from clipgen.files import atomic_write_json

    atomic_write_json(meta_path(run_dir), meta)


def read_config(run_dir: str | Path):
    """The run's composed config over today's schema defaults, so a key added to the schema after the run was
    trained reads as its default instead of failing (the file as it is when it does not fit the schema)."""
    from omegaconf.errors import OmegaConfBaseException

    from clipgen.config import Config

    path = config_path(run_dir)
    if not path.is_file():
        raise ClipgenError(f"{path} is missing: expected the run's resolved config")
    raw = OmegaConf.load(path)
    base = OmegaConf.structured(Config)
    OmegaConf.set_struct(base, False)
    try:
        merged = OmegaConf.merge(base, raw)
    except OmegaConfBaseException:
        return raw
    OmegaConf.set_struct(merged, False)
    return merged


# --- evaluation state ------------------------------------------------------------------------------------------
def _null_to_nan(metrics: dict) -> dict:
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


def read_results(path: str | Path) -> tuple[list[dict], bool]:
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


def result_key(rec: dict) -> tuple[str, str, str]:
    """What makes a results.jsonl line the evaluation of one checkpoint file for one task: (checkpoint file name,
    its sha256, task). A retrained checkpoint (other sha) is evaluated again."""
    return Path(str(rec.get("checkpoint", ""))).name, str(rec.get("checkpoint_sha256")), str(rec.get("task"))


def evaluated(run_dir: str | Path) -> set[tuple[str, str]]:
    """(task, checkpoint file name) of every result line: the cheap view a study's status table takes (it does not
    hash checkpoints); clipgen-eval itself also checks the hash (:func:`result_key`)."""
    try:
        records, _ = read_results(results_path(run_dir))
    except ClipgenError:  # an unreadable file: clipgen-eval reports it precisely when it runs
        return set()
    return {(str(r.get("task")), Path(str(r.get("checkpoint", ""))).name) for r in records}


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
