"""``run_export(cfg)``: write a run's checkpoint as open_clip's ``local-dir:`` folder (clipgen.models.export), for
open_clip, CLIP_benchmark and any tool built on them, none of which needs clipgen installed to read it.

    clipgen-export recipe=cg_high trainer.seed=0            # the last checkpoint of the run the config names
    clipgen-export export.run_dir=runs/runs/<run> export.epoch=4 export.dir=/shared/models/<name>

clipgen-train already writes ``{run}/export/epoch_NNN/`` for the last checkpoint of every CLIP run it finishes
(``export.after_training``); this command exports any other checkpoint, an older run, or into another folder
(the config names the vocabulary by absolute path, so a folder is exported where it will be used).
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from clipgen import rundir
from clipgen.errors import ClipgenError
from clipgen.models.export import export_checkpoint

log = logging.getLogger("clipgen.export")


def checkpoint_of(run_dir: Path, epoch: int) -> tuple[int, Path]:
    """(epoch, path) of the run's checkpoint ``epoch`` (-1 = its last)."""
    found = rundir.checkpoints(run_dir)
    if not found:
        raise ClipgenError(f"no checkpoints/epoch_*.pt in {run_dir}: expected at least the untrained epoch_000.pt")
    if epoch == -1:
        return found[-1]
    for e, path in found:
        if e == epoch:
            return e, path
    raise ClipgenError(f"export.epoch={epoch}: {run_dir.name} has no checkpoint of epoch {epoch}; expected one of "
                       f"{', '.join(str(e) for e, _ in found)} (or -1, the last)")


def export_run(run_dir: Path, epoch: int = -1, out_dir: str | Path | None = None) -> dict:
    """Export checkpoint ``epoch`` of a CLIP run into ``out_dir`` (default ``{run}/export/epoch_NNN``); a current
    export is left alone. Returns clipgen.models.export.export_checkpoint's result plus ``epoch``."""
    meta = rundir.load_meta(run_dir)
    if meta.get("model_kind", "clip") != "clip":
        raise ClipgenError(f"{run_dir.name} is a {meta['model_kind']} run: open_clip loads CLIP models only (the "
                           "supervised baseline has no text tower)")
    e, path = checkpoint_of(run_dir, int(epoch))
    out = out_dir or rundir.export_dir(run_dir, e)
    result = export_checkpoint(path, out, {"run": run_dir.name, "run_dir": str(run_dir.resolve())})
    return {**result, "epoch": e}


def run_export(cfg: DictConfig) -> dict:
    """The Hydra stage: export ``export.epoch`` of the run ``export.run_dir`` (or the run the config names)."""
    from clipgen.preflight import check_values

    check_values(cfg)
    from clipgen.recipes.naming import recipe_spec

    run_dir = rundir.resolve_run_dir(cfg, cfg.export.get("run_dir"), "export.run_dir",
                                     recipe_spec(cfg.recipe).recipe_id)
    out = export_run(run_dir, int(cfg.export.epoch), cfg.export.get("dir"))
    what = "exported" if out["written"] else "already exported"
    print(f"clipgen: {what} epoch {out['epoch']} of {run_dir.name} -> {out['dir']} ({out['bytes'] / 1e6:.1f} MB); "
          f"load it with open_clip.create_model_and_transforms('local-dir:{out['dir']}') and "
          f"open_clip.get_tokenizer('local-dir:{out['dir']}')")
    return out
