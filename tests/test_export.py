"""A run's checkpoint outside clipgen: the trainer's (and clipgen-export's) open_clip ``local-dir:`` folder is
loaded by open_clip, and by CLIP_benchmark's loader and zero-shot evaluation, in a Python that cannot import
clipgen, and classifies the run's test images exactly as clipgen-eval did."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cfg, scratch_dir

from clipgen import rundir
from clipgen.errors import ClipgenError

SMOKE = ("debug=smoke", "recipe=cg_high", "trainer.threads=1")


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """A finished smoke run (its own paths.root with the session's tiny world), evaluated by clipgen-eval."""
    from clipgen.eval.run import run_eval
    from clipgen.train.loop import run_train

    with scratch_dir(tmp_path_factory, "export_root") as root:
        shutil.copytree(Path(tiny_root) / "world", root / "world")
        out = run_train(make_cfg(root, *SMOKE))
        run_eval(make_cfg(root, *SMOKE, "eval.max_templates=4"))  # a small head: the comparison is per image
        yield root, Path(out["run_dir"])


def _closure(roots: tuple[str, ...]) -> list[md.Distribution]:
    """The installed distributions ``roots`` need, recursively (extras and markers that do not apply left out)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # e.g. clip_benchmark's captioning dependencies, not needed here
            continue
        seen[name] = dist
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def sandbox(folder: Path, roots: tuple[str, ...]) -> list[str]:
    """``folder`` filled with links to the top-level entries (packages, modules, their .libs and .dist-info) of
    exactly the distributions ``roots`` need. ``python -I -S`` with only this folder added to sys.path imports
    them and nothing else installed: no site-packages, no .pth file (clipgen's editable install is one), no
    PYTHONPATH, no working directory. Returns the distribution names."""
    folder.mkdir(parents=True, exist_ok=True)
    dists = _closure(roots)
    for dist in dists:
        for f in dist.files or []:
            if not f.parts or f.parts[0] in ("..", "__pycache__"):  # scripts in bin/, caches
                continue
            top = Path(dist.locate_file(f.parts[0]))
            link = folder / f.parts[0]
            if top.exists() and not link.exists():
                link.symlink_to(top)
    return sorted(d.metadata["Name"] for d in dists)


# Runs in the sandbox: open_clip alone, then (when installed) CLIP_benchmark's loader and zero-shot evaluation.
_OUTSIDE = r'''
import importlib.util, json, sys
spec = json.load(open(sys.argv[1]))
sys.path.insert(0, spec["sandbox"])
assert importlib.util.find_spec("clipgen") is None, "clipgen is importable in the sandbox"
import open_clip, torch
from PIL import Image

name = "local-dir:" + spec["export"]
model, _, preprocess = open_clip.create_model_and_transforms(name)
tokenizer = open_clip.get_tokenizer(name)
model.eval()
images = torch.stack([preprocess(Image.open(p)) for p in spec["paths"]])
with torch.no_grad():
    heads = []
    for c in spec["classes"]:
        t = model.encode_text(tokenizer([tpl.format(c) for tpl in spec["templates"]]))
        t = (t / t.norm(dim=-1, keepdim=True)).mean(0)
        heads.append(t / t.norm())
    f = model.encode_image(images)
    logits = model.logit_scale.exp() * (f / f.norm(dim=-1, keepdim=True) @ torch.stack(heads).T)
out = {"open_clip_preds": logits.argmax(1).tolist(), "open_clip_logits": logits.tolist(),
       "vocab_size": len(tokenizer.encoder)}
if importlib.util.find_spec("clip_benchmark") is not None:
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from clip_benchmark.models import load_clip

    cb_model, transform, cb_tokenizer = load_clip("open_clip", name, None, None, "cpu")
    cb_model.eval()  # as clip_benchmark's CLI does after load_clip

    class Images(torch.utils.data.Dataset):
        classes = spec["classes"]
        def __len__(self):
            return len(spec["paths"])
        def __getitem__(self, i):
            return transform(Image.open(spec["paths"][i])), spec["labels"][i]

    loader = torch.utils.data.DataLoader(Images(), batch_size=64)
    templates = [t.replace("{}", "{c}") for t in spec["templates"]]  # CLIP_benchmark's placeholder
    # evaluate() = these two + metrics; its accuracy() calls float() on a 1-element array, which NumPy 2 refuses
    classifier = zero_shot_classifier(cb_model, cb_tokenizer, spec["classes"], templates, "cpu", amp=False)
    logits, target = run_classification(cb_model, classifier, loader, "cpu", amp=False)
    out["clip_benchmark_preds"] = logits.argmax(1).tolist()
    out["clip_benchmark_acc1"] = float((logits.argmax(1) == target).float().mean())
out["clipgen_imported"] = any(m == "clipgen" or m.startswith("clipgen.") for m in sys.modules)
print(json.dumps(out))
'''


def _test_images(root: Path, run_dir: Path, epoch: int):
    """clipgen-eval's outputs of ``epoch`` and the image paths in their order."""
    from clipgen.eval.testsets import select_test_samples, task_domains

    from omegaconf import OmegaConf

    meta = json.loads(rundir.meta_path(run_dir).read_text())
    npz = np.load(rundir.eval_dir(run_dir) / "outputs" / f"epoch_{epoch:03d}.npz")
    samples = select_test_samples(OmegaConf.load(rundir.config_path(run_dir)), meta, rundir.meta_path(run_dir),
                                  task_domains(meta))
    by_id = {s.sample_id: s.path for s in samples}
    return npz, [by_id[i] for i in npz["sample_ids"]]


@pytest.mark.slow
def test_export_loads_in_open_clip_and_clip_benchmark_without_clipgen(trained, tmp_path):
    root, run_dir = trained
    meta = json.loads(rundir.meta_path(run_dir).read_text())
    last = meta["epochs"]
    export = rundir.export_dir(run_dir, last)
    assert sorted(p.name for p in export.iterdir()) == ["clipgen-tiny-bpe.txt.gz", "clipgen_export.json",
                                                        "open_clip_config.json", "open_clip_model.safetensors"]
    npz, paths = _test_images(root, run_dir, last)
    head = json.loads((rundir.eval_dir(run_dir) / "zeroshot_head.json").read_text())
    names = sandbox(tmp_path / "site", ("open_clip_torch", "clip-benchmark"))
    assert "open_clip_torch" in names and not any("clipgen" in n for n in names)
    spec = {"sandbox": str(tmp_path / "site"), "export": str(export), "paths": paths, "classes": head["classes"],
            "templates": head["templates"], "labels": npz["labels"].tolist()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _OUTSIDE, str(tmp_path / "spec.json")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["clipgen_imported"] and got["vocab_size"] == 1781  # the compact vocabulary, from the folder
    # the same predictions as clipgen-eval on every test image (real and sketch, all classes)
    assert got["open_clip_preds"] == npz["preds"].tolist()
    assert np.allclose(got["open_clip_logits"], npz["logits"].astype(np.float32), rtol=2e-3, atol=2e-3)  # f16 kept
    acc = float((npz["preds"] == npz["labels"]).mean())
    if "clip_benchmark_acc1" not in got:
        pytest.skip("clip_benchmark is not installed (.ci/run installs it): open_clip's half passed")
    assert got["clip_benchmark_preds"] == npz["preds"].tolist()
    assert got["clip_benchmark_acc1"] == pytest.approx(acc, abs=1e-6)


def test_clipgen_export_of_another_epoch_and_folder_and_its_errors(trained, tmp_path):
    from clipgen.export.run import run_export
    from clipgen.models.export import PROVENANCE, WEIGHTS

    root, run_dir = trained
    before = {p: p.stat().st_mtime_ns for p in rundir.export_dir(run_dir, 2).iterdir()}
    out = run_export(make_cfg(root, *SMOKE, "export.epoch=1", f"export.dir={tmp_path / 'e1'}"))
    assert out["written"] and out["epoch"] == 1 and Path(out["dir"]) == tmp_path / "e1"
    prov = json.loads((tmp_path / "e1" / PROVENANCE).read_text())
    assert prov["run"] == run_dir.name and prov["epoch"] == 1 and prov["checkpoint"].endswith("epoch_001.pt")
    cfg = json.loads((tmp_path / "e1" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["tokenizer_kwargs"]["bpe_path"] == str(tmp_path / "e1" /
                                                                                 "clipgen-tiny-bpe.txt.gz")
    mtime = (tmp_path / "e1" / WEIGHTS).stat().st_mtime_ns
    again = run_export(make_cfg(root, *SMOKE, "export.epoch=1", f"export.dir={tmp_path / 'e1'}"))
    assert not again["written"] and (tmp_path / "e1" / WEIGHTS).stat().st_mtime_ns == mtime  # current: kept
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "e1", moved)  # the vocabulary's absolute path is gone: exported anew
    assert run_export(make_cfg(root, *SMOKE, "export.epoch=1", f"export.dir={moved}"))["written"]
    assert run_export(make_cfg(root, *SMOKE))["written"] is False  # the trainer's export of the last epoch
    assert {p: p.stat().st_mtime_ns for p in rundir.export_dir(run_dir, 2).iterdir()} == before
    with pytest.raises(ClipgenError, match=r"^export.epoch=7: .* has no checkpoint of epoch 7; expected one of 0, 1, "
                                           r"2 \(or -1, the last\)$"):
        run_export(make_cfg(root, *SMOKE, "export.epoch=7"))
    with pytest.raises(ClipgenError, match=r"^export.epoch=-2: expected -1 \(the last\) or an epoch >= 0$"):
        run_export(make_cfg(root, *SMOKE, "export.epoch=-2"))
    with pytest.raises(ClipgenError, match="does not exist: point export.run_dir at a run directory"):
        run_export(make_cfg(root, *SMOKE, f"export.run_dir={tmp_path / 'nowhere'}"))
