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
