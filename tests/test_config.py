"""Every config in conf/ composes; misspelt keys and wrong types fail at compose time; facts are consistent."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import make_cfg
from clipgen.facts import DOMAINS, domainnet_classes, domainnet_label, zeroshot_templates
from clipgen.recipes.naming import recipe_spec

CONF = Path(__file__).resolve().parents[1] / "clipgen" / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))


def group_options():
    for group in GROUPS:
        for f in sorted((CONF / group).glob("*.yaml")):
            yield group, f.stem


@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_config_composes(tmp_path, group, option):
    extra = []
    if group == "data" and option == "domainnet":
        extra = ["data.domainnet_root=/d", "data.imagenet_captions_json=/c.json", "data.imagenet_train_root=/t"]
    cfg = make_cfg(tmp_path, f"{group}={option}", *extra)
    assert cfg.paths.root == str(tmp_path)
    if group == "recipe":
        recipe_spec(cfg.recipe)  # every shipped recipe is valid


@pytest.mark.parametrize("overrides", [(), ("debug=smoke",), ("experiment=quickstart",),
                                       ("experiment=paper_grid", "debug=rehearsal", "data.domainnet_root=/d",
                                        "data.imagenet_captions_json=/c.json", "data.imagenet_train_root=/t"),
                                       ("experiment=world_domains", "debug=smoke", "trainer.seed=3")])
def test_the_tests_composed_once_config_is_the_one_composing_gives(tmp_path, overrides):
    """conftest.make_cfg composes each override list once and sets paths.root on a copy: the same config, the
    same flags and the same resolved paths as composing with paths.root=<root>, and no copy shares a node."""
    from omegaconf import OmegaConf

    from clipgen.config import compose_config

    expected = compose_config([f"paths.root={tmp_path}", *overrides])
    first, second = make_cfg(tmp_path, *overrides), make_cfg(tmp_path / "other", *overrides)
    assert OmegaConf.to_container(first) == OmegaConf.to_container(expected)  # interpolations as written
    assert OmegaConf.to_container(first, resolve=True) == OmegaConf.to_container(expected, resolve=True)
    assert OmegaConf.is_struct(first) == OmegaConf.is_struct(expected)
    assert second.paths.root == str(tmp_path / "other") and first.paths.root == str(tmp_path)
    second.trainer.epochs += 1
    assert first.trainer.epochs == expected.trainer.epochs


def test_groups_mirror_the_stages():
    for g in ("world", "data", "heldout", "recipe", "model", "optim", "trainer", "eval", "logger", "paths",
              "experiment", "debug", "study"):
        assert g in GROUPS


def test_misspelt_key_and_wrong_type_fail_at_compose(tmp_path):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        make_cfg(tmp_path, "trainer.epochz=3")
    assert "epochz" in str(e.value) or "epochz" in str(e.value.__cause__)
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        make_cfg(tmp_path, "trainer.epochs=three")
    assert "three" in str(e.value) or "three" in str(e.value.__cause__)


def test_cli_prints_hydra_message_for_misspelt_override(tmp_path):
    out = subprocess.run(["clipgen-train", f"paths.root={tmp_path}", "recipe.kindd=x"], capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert "kindd" in out.stderr


def test_cfg_job_prints_composed_config(tmp_path):
    out = subprocess.run(["clipgen-train", f"paths.root={tmp_path}", "experiment=quickstart", "--cfg", "job"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: quickstart" in out.stdout and "clipgen-tiny-rn" in out.stdout


def test_facts():
    assert DOMAINS == ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    classes = domainnet_classes()
    assert len(classes) == 345 and classes[0] == "aircraft carrier"
    assert domainnet_label("The_Eiffel_Tower") == 308 and domainnet_label("television") == 305
    paper = make_cfg("/tmp").heldout.classes
    assert [domainnet_label(c) for c in paper] == [0, 11, 13, 15, 25, 58, 174, 190, 197, 218, 225, 250, 305,
                                                   319, 320]
    assert len(zeroshot_templates("paper86")) == 86
    free = zeroshot_templates("domain_free")
    assert 0 < len(free) < 86
    for t in free:
        for w in ("sketch", "photo", "painting", "drawing", "clipart", "infograph", "quickdraw", "doodle"):
            assert w not in t


def _schema_default(node, key):
    from omegaconf import OmegaConf

    return (OmegaConf.to_container(node[key], resolve=False) if OmegaConf.is_config(node[key])
            else node._get_node(key)._value())


def test_every_default_is_written_once():
    """A group file holds only what that group member changes: no key restates the schema's default
    (clipgen/config.py holds each default once), so a default changed there is changed everywhere."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import clipgen
    from clipgen.config import Config

    schema = OmegaConf.structured(Config)
    conf = Path(clipgen.__file__).parent / "conf"
    repeated = []
    for f in sorted(conf.rglob("*.yaml")):
        group = f.relative_to(conf).parts[0]
        if group in ("experiment", "debug", "hydra") or f.name == "config.yaml" or "@package _global_" in f.read_text():
            continue
        for key, value in (OmegaConf.to_container(OmegaConf.load(f)) or {}).items():
            if key in schema[group] and _schema_default(schema[group], key) == value:
                repeated.append(f"{f.relative_to(conf)}: {key}")
    assert not repeated, repeated


def test_slurm_launcher_presets_ask_for_the_studys_job_shape():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="clipgen.conf", version_base="1.3"):
        for stage in ("train", "eval"):
            cfg = compose(config_name="config", return_hydra_config=True,
                          overrides=[f"hydra/launcher=slurm_{stage}", f"study.slurm.{stage}.partition=gpu"])
            launcher, study = cfg.hydra.launcher, cfg.study.slurm[stage]
            assert launcher.partition == "gpu"
            assert all(launcher[k] == study[k] for k in ("timeout_min", "tasks_per_node", "gpus_per_node",
                                                        "cpus_per_task", "mem_gb", "max_num_timeout"))
