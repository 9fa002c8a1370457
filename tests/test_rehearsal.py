"""The paper path rehearsed end to end: the README's cluster commands, with the rehearsal world's paths swapped in
for /data/..., plan every paper preset on DomainNet's full class list and run one run of every distinct model and
objective at its real image size (224 px RN50 / ViT-B-32 / Swin-T CLIP, RN50 supervised, on CPU) through recipe ->
train -> eval -> report. The presets that train as that paper_grid RN50 run does but for their data (allow,
interpolation, aligned: their recipes; cc12m: its base corpus, learning rate and accum_steps=1, the default every
other training test runs) build their recipe and test set for real and are checked setting by setting."""
from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import make_cfg, scratch_dir
from clipgen.data.sources import base_index, domainnet_index
from clipgen.facts import domainnet_classes, domainnet_to_imagenet
from clipgen.launch.study import run_study
from clipgen.recipes.grid import study_runs
from clipgen.preflight import check_run_config
from clipgen.recipes.build import build_recipe
from clipgen.recipes.naming import recipe_spec
from clipgen.world.generate import generate_world

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
EXPECTED_RUNS = {"paper_grid": 78, "paper_allow": 60, "paper_interpolation": 18, "paper_aligned": 1,
                 "paper_supervised": 16, "paper_cc12m": 7}


def readme_commands() -> list[list[str]]:
    """Every ``clipgen-study experiment=...`` command of the README (continuation lines joined), as arguments
    (without the program name)."""
    text = README.read_text().replace("\\\n", " ")
    return [shlex.split(line, comments=True)[1:] for line in text.splitlines()
            if line.startswith("clipgen-study experiment=")]


def cluster_command(experiment: str, world: Path, cc: Path | None = None) -> list[str]:
    """The README's cluster (not dry-run, not rehearsal) command of a preset (paper_grid's for the paper presets
    without their own) with the real paths swapped for the rehearsal world's: /data/domainnet -> W/domainnet,
    /data/imagenet... -> W/natural/..., CC12M -> shards faked from the world's base corpus."""
    cluster = [c for c in readme_commands() if not any(a.startswith(("study.dry_run", "debug=")) for a in c)]
    cmds = [c for c in cluster if c[0] == f"experiment={experiment}"]
    if not cmds:  # the README: every other paper preset takes paper_grid's command with its own name
        cmds = [[f"experiment={experiment}", *c[1:]] for c in cluster if c[0] == "experiment=paper_grid"]
    assert cmds, f"the README shows no cluster command for {experiment}"
    swap = {"/data/domainnet": f"{world}/domainnet", "/data/imagenet_captions.json":
            f"{world}/natural/imagenet_captions.json", "/data/imagenet/train": f"{world}/natural/train"}
    out = []
    for arg in cmds[0]:
        key, _, value = arg.partition("=")
        if value in swap:
            arg = f"{key}={swap[value]}"
        elif key == "data.cc_shards":
            assert cc is not None
            arg = f"data.cc_shards='{cc}/{{00000..00001}}.tar'"
        assert "/data/" not in arg, arg
        out.append(arg)
    return out


def readme_data_commands(world: Path, cc: Path) -> list[tuple[str, list[str]]]:
    """Every clipgen-study / clipgen-train command of the README that names real data, with the rehearsal world's
    paths swapped in, Hydra's launcher keys left out and each sweep at its first value (one job of it)."""
    text = README.read_text().replace("\\\n", " ")
    swap = {"/data/domainnet": f"{world}/domainnet", "/data/imagenet_captions.json":
            f"{world}/natural/imagenet_captions.json", "/data/imagenet/train": f"{world}/natural/train",
            "$W/domainnet": f"{world}/domainnet", "$W/natural/imagenet_captions.json":
            f"{world}/natural/imagenet_captions.json", "$W/natural/train": f"{world}/natural/train"}
    out = []
    for line in text.splitlines():
        if not line.startswith(("clipgen-study ", "clipgen-train ")) or ("/data/" not in line and "$W" not in line):
            continue
        args = []
        for arg in shlex.split(line, comments=True)[1:]:
            key, _, value = arg.partition("=")
            if arg in ("-m", "...") or key.startswith(("hydra/launcher", "hydra.launcher")):
                continue
            if key == "data.cc_shards":
                value = f"'{cc}/{{00000..00001}}.tar'"
            elif not value.startswith("[") and "," in value:
                value = value.split(",")[0]
            args.append(f"{key}={swap.get(value, value)}")
        out.append((line.split()[0], args))
    return out


def test_readme_data_commands_compose_and_read_the_rehearsal_world(full_world):
    """The README's cluster and DomainNet commands work as written: they compose, pass the cross-key checks, and
    read DomainNet and their base corpus from the paths they name."""
    root, world = full_world
    commands = readme_data_commands(world, _cc_shards(world, root / "cc12m"))
    assert len(commands) >= 6
    for program, args in commands:
        cfg = make_cfg(root, *args)
        check_run_config(cfg)
        assert cfg.data.source == "domainnet" and cfg.recipe.image_px == cfg.model.image_px == 224, args
        assert str(world) in str(domainnet_index(cfg)[0].path)
        assert len(base_index(cfg)) > 0


def _world(root, *overrides: str) -> Path:
    return generate_world(make_cfg(root, "world=rehearsal", "model=rn50", *overrides))


def _cc_shards(world: Path, out: Path) -> Path:
    """Two img2dataset-style shards (jpg + txt) of the world's base corpus: CC12M's shape, faked."""
    entries = json.loads((world / "natural" / "imagenet_captions.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    half = (len(entries) + 1) // 2
    for si in range(2):
        with tarfile.open(out / f"{si:05d}.tar", "w") as tf:
            for j, e in enumerate(entries[si * half:(si + 1) * half]):
                key = f"{si:05d}{j:04d}"
                jpg = (world / "natural" / "train" / e["wnid"] / e["filename"]).read_bytes()
                for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", f"{e['title']} {' '.join(e['tags'])}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(scope="module")
def full_world(tmp_path_factory):
    """The 345-class rehearsal world with one train image per domain x class (4,140 DomainNet images + the
    ImageNet-Captions-shaped base), stored at the 56 px it is drawn at: these tests list, index and plan it, and
    never decode it; the 224 px files a run reads are the small world's (at 224 px this world took 17.5 CPU s to
    generate, at 56 px 13.9)."""
    with scratch_dir(tmp_path_factory, "rehearsal_full") as root:
        yield root, _world(root, "world.train_per_class=1", "world.image_px=56")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """4 of the real classes (2 of C2 first), 1 train + 1 test image per domain x class: a few steps per run."""
    with scratch_dir(tmp_path_factory, "rehearsal_small") as root:
        world = _world(root, "world.num_classes=4", "world.num_heldout=2", "world.train_per_class=1")
        yield root, world, _cc_shards(world, root / "cc12m")


def test_rehearsal_world_has_domainnet_shape(full_world):
    root, world = full_world
    dn = world / "domainnet"
    assert (dn / "sketch" / "The_Eiffel_Tower").is_dir() and (dn / "real" / "aircraft_carrier").is_dir()
    line = (dn / "real_train.txt").read_text().splitlines()[0]
    assert re.fullmatch(r"real/aircraft_carrier/real_000_000000\.jpg 0", line)
    cfg = make_cfg(root, *cluster_command("paper_grid", world))
    index = domainnet_index(cfg)
    assert {s.class_name for s in index} == set(domainnet_classes())
    eiffel = {(s.label, Path(s.path).parent.name) for s in index if s.class_name == "the eiffel tower"}
    assert eiffel == {(308, "The_Eiffel_Tower")}  # DomainNet's label, cased folder
    base = base_index(cfg)  # the ImageNet-Captions reader on {wnid}/{file}.JPEG
    mapped = [c for c in domainnet_classes() if domainnet_to_imagenet()[c]]
    assert len(base) == len(mapped) and all(s.path.endswith(".JPEG") for s in base)
    assert all(re.fullmatch(r"n\d{8}", Path(s.path).parent.name) for s in base)


@pytest.mark.parametrize("experiment", sorted(EXPECTED_RUNS))
def test_paper_preset_dry_run_plans_every_recipe(full_world, experiment, capsys):
    root, world = full_world
    cc = _cc_shards(world, root / "cc12m") if experiment == "paper_cc12m" else None
    cfg = make_cfg(root, *cluster_command(experiment, world, cc), "study.dry_run=true")
    out = run_study(cfg)
    assert out["dry_run"] and len(out["runs"]) == out["to_train"] == EXPECTED_RUNS[experiment]
    assert f"study {cfg.study.name}: {EXPECTED_RUNS[experiment]} runs" in capsys.readouterr().out
    seen = set()
    for _, sub in study_runs(cfg):
        sub.recipe.dry_run = True
        plan = build_recipe(sub)
        seen.add(plan["recipe_id"])
        assert plan["target_size"] is None or plan["num_samples"] == plan["target_size"]
    assert len(seen) == len(out["runs"]) // len(cfg.study.seeds)  # the seeds of a recipe share it
    assert not (root / "recipes").exists() or not any((root / "recipes").glob("lso-*"))  # a dry run writes nothing


def test_readme_rehearsal_command_is_the_cluster_command_with_the_paths_swapped(tmp_path):
    """What the README tells a user to rehearse is what test_rehearsal_run_of_each_paper_preset[paper_grid-RN50]
    runs: the cluster command's arguments (paths swapped) + debug=rehearsal + the one-run restriction."""
    world = tmp_path / "W"
    rehearsals = [[a.replace("$W", str(world)) for a in c] for c in readme_commands() if "debug=rehearsal" in c]
    assert len(rehearsals) == 1
    ran = {*cluster_command("paper_grid", world), "debug=rehearsal", *ONE_RUN}
    assert set(rehearsals[0]) <= ran
    assert {a for a in ran - set(rehearsals[0])} <= {a for a in ran if a.startswith("study.slurm.")}


# (preset, extra overrides restricting it to one run, expected model name)
ONE_RUN = ["study.test_domains=[sketch]", "study.recipes=[cg_high]", "study.seeds=[0]"]  # the README's rehearsal
RUNS = [
    ("paper_grid", ONE_RUN, "RN50"),
    ("paper_grid", ["study.test_domains=[sketch]", "study.recipes=[cg_low]", "study.seeds=[0]", "model=vit_b_32"],
     "ViT-B-32"),
    ("paper_grid", ["study.test_domains=[sketch]", "study.recipes=[cg_low]", "study.seeds=[0]", "model=swin_t"],
     "clipgen-swin-t"),
    ("paper_supervised", ["study.test_domains=[sketch]", "study.recipes=[cg_low]"], "RN50"),
]


# Presets that train as paper_grid's RN50 run but for their data: (preset, restriction to one run, the settings of
# their own). allow / interpolation / aligned are paper_grid with other recipes; cc12m reads its base corpus from
# CC12M's shards, with its own learning rate and no gradient accumulation (accum_steps=1, every other test's).
CC12M_OWN = {"data.base", "data.cc_shards", "data.imagenet_captions_json", "data.imagenet_train_root", "optim.lr",
             "trainer.accum_steps"}
RECIPE_ONLY = [
    ("paper_allow", ["study.test_domains=[sketch]", "study.recipes=[allow:0.4:cg_low]"], set()),
    ("paper_interpolation", ["study.test_domains=[sketch]", "study.recipes=[interpolation:qrs]"], set()),
    ("paper_aligned", [], set()),
    ("paper_cc12m", ["study.test_domains=[sketch]", "study.recipes=[cg_low]"], CC12M_OWN),
]


def _one_run_config(root: Path, *args: str):
    """The config of the single run a rehearsal command trains."""
    cfg = make_cfg(root, *args, "debug=rehearsal", "trainer.threads=1")
    check_run_config(cfg)
    runs = study_runs(cfg)
    assert len(runs) == 1, [job for job, _ in runs]
    return runs[0][1]


def _training_settings(sub) -> dict:
    """Everything of a run's config but the recipe and the study / W&B labels that name it, as dotted keys."""
    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    out = OmegaConf.to_container(sub, resolve=True)
    for key in ("recipe", "study", "logger"):
        out.pop(key)
    return dict(flat(out))


@pytest.mark.parametrize("experiment,restrict,own", RECIPE_ONLY, ids=[e for e, _, _ in RECIPE_ONLY])
def test_rehearsal_of_each_recipe_only_preset_builds_its_data_for_the_paper_grid_run(small_world, experiment,
                                                                                    restrict, own):
    """The run of these presets trains exactly as paper_grid-RN50 (run end to end below) in every setting but its
    recipe and ``own``; what is their own data is rehearsed for real: the recipe built from the DomainNet layout
    (and, for cc12m, from the CC12M-shaped shards) at 224 px and read by the trainer's loader, and the evaluation
    set of its test domain."""
    import open_clip

    from clipgen.eval.testsets import load_eval_set, task_name
    from clipgen.train.data import load_train_data

    root, world, cc = small_world
    sub = _one_run_config(root, *cluster_command(experiment, world, cc), *restrict)
    grid = _one_run_config(root, *cluster_command("paper_grid", world, cc), *ONE_RUN)
    mine, grids = _training_settings(sub), _training_settings(grid)
    assert {k for k in mine.keys() | grids.keys() if mine.get(k) != grids.get(k)} == own
    assert sub.model.name == "RN50" and sub.recipe.image_px == sub.model.image_px == 224

    plan = build_recipe(sub)
    manifest = json.loads((Path(plan["recipe_dir"]) / "manifest.json").read_text())
    assert plan["recipe_id"] == recipe_spec(sub.recipe).recipe_id and plan["num_samples"] > 0
    assert manifest["aligned_captions"] == (experiment == "paper_aligned")
    assert manifest["source"]["base"] == sub.data.base and manifest["base"]["num_samples"] > 0  # cc12m: "cc"
    data = load_train_data(plan["recipe_dir"], open_clip.get_tokenizer(sub.model.name), 224)
    assert data.num_recipe == plan["num_samples"] and tuple(data.images.shape[1:]) == (3, 224, 224)
    assert len(data) >= sub.trainer.batch_size  # at least the one step per epoch the rehearsal trains
    meta = {"classes": manifest["classes"], "test_domain": manifest["test_domain"], "recipe_kind": manifest["kind"]}
    evalset = load_eval_set(sub, meta, "recipe manifest", 224)
    assert list(evalset.tasks) == [task_name(sub.recipe.test_domain)]
    assert tuple(evalset.images.shape[1:]) == (3, 224, 224) and len(set(evalset.domains)) == 2  # real + D


@pytest.mark.parametrize("experiment,restrict,model", RUNS, ids=[f"{e}-{m}" for e, _, m in RUNS])
def test_rehearsal_run_of_each_paper_preset(small_world, one_torch_thread, experiment, restrict, model):
    root, world, cc = small_world
    cfg = make_cfg(root, *cluster_command(experiment, world, cc), "debug=rehearsal", *restrict,
                   "trainer.threads=1")  # one thread: a busy shared CPU makes OpenMP's spin-waits ~10x slower
    assert cfg.model.name == model and cfg.recipe.image_px == cfg.model.image_px == 224
    _run_and_check(cfg, root)


@pytest.mark.parametrize("experiment", ["world_study", "quickstart"])
def test_rehearsal_run_of_each_world_preset(tmp_path, one_torch_thread, experiment):
    """The world presets read the synthetic world itself; the tiny world stands in for their larger ones."""
    cfg = make_cfg(tmp_path, f"experiment={experiment}", "debug=rehearsal", "world=tiny",
                   "study.test_domains=[sketch]", "study.recipes=[cg_low]", "study.seeds=[0]", "trainer.threads=1")
    assert cfg.model.name == "clipgen-tiny-rn" and cfg.world.image_px == cfg.recipe.image_px == 32
    _run_and_check(cfg, tmp_path)


def _run_and_check(cfg, root: Path) -> None:
    out = run_study(cfg)
    try:
        assert len(out["runs"]) == 1
        run = Path(out["runs"][0])
        meta = json.loads((run / "meta.json").read_text())
        assert meta["status"] == "finished" and meta["image_px"] == cfg.model.image_px
        records = [json.loads(x) for x in (run / "eval" / "results.jsonl").read_text().splitlines()]
        assert sorted({r["epoch"] for r in records}) == [0, 1]
        assert {r["model_name"] for r in records} == {cfg.model.name}
        if cfg.trainer.objective == "clip":
            assert {r["eval_config"]["max_templates"] for r in records} == {2}
        assert Path(out["report"]).is_file() and Path(out["report"]).parent.parent.name == "reports"
    finally:
        shutil.rmtree(root / "runs", ignore_errors=True)  # ~2 GB of 224 px checkpoints per run
