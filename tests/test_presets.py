"""Every experiment preset, alone and under every debug preset, composes into a config whose keys agree with each
other: image sizes, test domains vs recipe ids, objective vs optimiser, launcher keys, run counts. A preset that
would build its recipes and then fail every training job fails here, in a second, instead."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_cfg, scratch_dir
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAIN_LETTERS, TEST_DOMAINS, domainnet_classes, zeroshot_templates
from clipgen.launch.study import LAUNCHERS
from clipgen.recipes.grid import study_runs
from clipgen.preflight import check_run_config, native_image_size, uses_world
from clipgen.recipes.naming import recipe_spec
from clipgen.train.objective import check_objective_name, objective_for
from clipgen.train.optim import check_optim_config

CONF = Path(__file__).resolve().parents[1] / "clipgen" / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEBUGS = [None, *sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))]
# The run counts the presets' comments and the README promise.
EXPECTED_RUNS = {"paper_grid": 78, "paper_allow": 60, "paper_interpolation": 18, "paper_aligned": 1,
                 "paper_supervised": 16, "paper_cc12m": 7, "world_study": 25, "world_mech": 25, "world_domains": 105,
                 "quickstart": 4}
# Required dataset paths of each data preset (any value: nothing is read when composing).
DATA_PATHS = {"domainnet": ["data.domainnet_root=/data/domainnet", "data.imagenet_captions_json=/data/ic.json",
                            "data.imagenet_train_root=/data/imagenet/train"],
              "domainnet_cc": ["data.domainnet_root=/data/domainnet", "data.cc_shards=/data/cc12m/00000.tar"]}


def compose_preset(root, experiment: str, debug: str | None, *extra: str):
    """The preset composed with the dataset paths its data preset requires (conftest.make_cfg composes each
    distinct list once and gives each caller its own copy)."""
    paths = DATA_PATHS.get(_data_preset(root, experiment), [])
    return make_cfg(root, f"experiment={experiment}", *([f"debug={debug}"] if debug else []), *paths, *extra)


def _data_preset(root, experiment: str) -> str:
    """Which data preset an experiment selects (the debug presets keep the experiment's data)."""
    cfg = make_cfg(root, f"experiment={experiment}")
    if cfg.data.source == "world":
        return "world"
    return "domainnet_cc" if cfg.data.base == "cc" else "domainnet"


@pytest.fixture(scope="module")
def preset_root(tmp_path_factory):
    """The paths.root of the composed presets: composing, checking and planning write nothing under it."""
    with scratch_dir(tmp_path_factory, "presets") as root:
        yield root
        written = sorted(p.name for p in root.iterdir())
    assert not written, f"composing, checking or planning a preset wrote {written} under paths.root"


def test_every_experiment_has_an_expected_run_count():
    assert sorted(EXPECTED_RUNS) == EXPERIMENTS


@pytest.mark.parametrize("debug", DEBUGS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_preset_keys_agree(preset_root, experiment, debug):
    cfg = compose_preset(preset_root, experiment, debug)
    check_run_config(cfg)  # the checks every train / study call runs first

    # One image size from the model config to the disk.
    px = int(cfg.model.image_px)
    assert px == native_image_size(cfg.model.name)
    assert int(cfg.recipe.image_px) == px
    if uses_world(cfg):
        assert int(cfg.world.image_px) == px

    # Test domains and recipe ids: every run's recipe is about its test domain, and the study has the promised runs.
    assert set(cfg.study.test_domains) <= set(TEST_DOMAINS)
    runs = study_runs(cfg)
    assert len(runs) == EXPECTED_RUNS[experiment]
    for job, sub in runs:
        spec = recipe_spec(sub.recipe)
        assert spec.test_domain == job.test_domain
        if spec.kind != "natural_only":
            assert f"no{job.test_domain}classes" in spec.recipe_id
            assert (DOMAIN_LETTERS[job.test_domain] in spec.recipe_id.split("-")[1]) == (spec.kind != "lod")
    assert set(cfg.heldout.classes) <= set(domainnet_classes())

    # Objective and optimiser belong together (protocol §5: the supervised baseline is SGD + step schedule).
    check_objective_name(cfg.trainer.objective)
    check_optim_config(cfg.optim)
    objective_for(cfg.trainer.objective).check(cfg)
    if cfg.trainer.objective == "supervised":
        assert (cfg.optim.name, cfg.optim.schedule) == ("sgd", "step")
        if debug is None:
            assert list(cfg.optim.milestones) == sorted(cfg.optim.milestones)
            assert all(0 < m < cfg.trainer.epochs for m in cfg.optim.milestones)
    else:
        assert (cfg.trainer.objective, cfg.optim.name, cfg.optim.schedule) == ("clip", "adamw", "cosine")
    assert cfg.trainer.batch_size % cfg.trainer.accum_steps == 0

    # Launcher keys: a SLURM study has one task per GPU and a global batch that splits over ranks x micro-batches;
    # a run that may land on a CPU does not ask for CUDA-only precision.
    assert cfg.study.launcher in LAUNCHERS
    if cfg.study.launcher == "slurm":
        tr = cfg.study.slurm.train
        if tr.gpus_per_node:
            assert tr.tasks_per_node == tr.gpus_per_node
        ranks = tr.nodes * tr.tasks_per_node
        assert cfg.trainer.batch_size % (ranks * cfg.trainer.accum_steps) == 0
        assert cfg.study.slurm.eval.nodes == 1
    if cfg.trainer.device == "cpu" or cfg.study.launcher != "slurm":
        assert cfg.trainer.precision != "amp"

    # Templates: the paper's head unless a rehearsal says otherwise.
    assert len(zeroshot_templates(cfg.eval.templates)) > 0
    assert (cfg.eval.max_templates > 0) == (debug == "rehearsal")


def test_rehearsal_keeps_the_presets_model_recipes_and_keys(preset_root):
    for experiment in EXPERIMENTS:
        full, rehearsal = compose_preset(preset_root, experiment, None), compose_preset(preset_root, experiment,
                                                                                        "rehearsal")
        for key in ("model", "recipe", "heldout", "data.source", "data.base", "study.test_domains", "study.recipes",
                    "study.seeds", "trainer.objective", "trainer.accum_steps", "trainer.grad_checkpointing",
                    "optim.name", "optim.schedule", "eval.templates"):
            node_a, node_b = full, rehearsal
            for part in key.split("."):
                node_a, node_b = node_a[part], node_b[part]
            assert node_a == node_b, (experiment, key)


@pytest.mark.parametrize("override,needle", [
    ("recipe.image_px=32", "recipe.image_px=32 does not match model.image_px=224"),
    ("model.image_px=32", "model.image_px=32 does not match model.name=RN50's input size 224"),
])
def test_size_mismatch_refused_before_anything_is_built(preset_root, override, needle):
    cfg = compose_preset(preset_root, "paper_grid", None, override)
    with pytest.raises(ClipgenError, match=needle):
        check_run_config(cfg)


def test_world_size_follows_the_model_unless_set(tmp_path):
    cfg = make_cfg(tmp_path, "model=rn50")
    assert cfg.world.image_px == cfg.recipe.image_px == 224
    cfg = make_cfg(tmp_path, "world.image_px=48")
    with pytest.raises(ClipgenError, match="world.image_px=48 does not match recipe.image_px=32"):
        check_run_config(cfg)


@pytest.mark.parametrize("override,key", [
    ("data.domainnet_root=/data/domainnet", "data.domainnet_root"),
    ("data.imagenet_captions_json=/data/ic.json", "data.imagenet_captions_json"),
    ("data.cc_shards=/data/cc/0.tar", "data.cc_shards"),
    ("data.imagenet_sketch_root=/data/sketch", "data.imagenet_sketch_root"),
])
def test_dataset_key_for_an_unselected_source_is_an_error(tmp_path, override, key):
    """Without data=domainnet, data.domainnet_root=... used to be ignored and the run trained on the world."""
    cfg = make_cfg(tmp_path, override)
    with pytest.raises(ClipgenError, match=f"{key}=.* is set but not read with data.source=world"):
        check_run_config(cfg)


def test_cli_refuses_a_size_mismatch_in_one_line_before_building(tmp_path):
    import subprocess

    out = subprocess.run(["clipgen-study", f"paths.root={tmp_path}", "experiment=paper_grid", *DATA_PATHS["domainnet"],
                          "recipe.image_px=32"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["clipgen: error: recipe.image_px=32 does not match model.image_px=224 "
                                               "(model.name=RN50): expected recipe.image_px=224, or leave it unset "
                                               "(it follows the model)"]
    assert not any(tmp_path.iterdir())  # no world, recipe, log or run was written
