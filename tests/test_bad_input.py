"""Bad input gives one clear error naming the thing and what was expected; nothing half-written is left."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import make_cfg
from clipgen import layout
from clipgen.data.domainnet import read_domainnet
from clipgen.errors import ClipgenError
from clipgen.recipes.build import build_recipe


@pytest.fixture()
def dn_copy(tiny_root, tmp_path):
    src = layout.world_dir(make_cfg(tiny_root, "debug=smoke")) / "domainnet"
    dst = tmp_path / "dn"
    shutil.copytree(src, dst)
    return dst


def dn_cfg(root, dn, *extra):
    return make_cfg(root, "debug=smoke", "data=domainnet", f"data.domainnet_root={dn}", "data.base=none", *extra)


def test_reader_matches_split_files_exactly(dn_copy):
    samples = read_domainnet(dn_copy)
    listed = []
    for f in sorted(dn_copy.glob("*_*.txt")):
        for line in f.read_text().splitlines():
            rel, label = line.split()
            listed.append((rel, int(label), f.stem.split("_")[1]))
    got = sorted((os.path.relpath(s.path, dn_copy), s.label, s.split) for s in samples)
    assert got == sorted(listed)
    on_disk = sorted(os.path.relpath(os.path.join(d, f), dn_copy) for d, _, fs in os.walk(dn_copy) for f in fs
                     if f.endswith(".png"))
    assert on_disk == sorted(r for r, _, _ in listed)


def test_missing_split_file(dn_copy, tmp_path):
    (dn_copy / "sketch_test.txt").unlink()
    with pytest.raises(ClipgenError, match=r"split file .*sketch_test.txt' is missing"):
        build_recipe(dn_cfg(tmp_path / "out", dn_copy))
    assert not (tmp_path / "out" / "recipes").exists() or not any((tmp_path / "out" / "recipes").iterdir())


def test_malformed_split_file(dn_copy, tmp_path):
    with open(dn_copy / "clipart_train.txt", "a") as f:
        f.write("clipart/axe/only_a_path\n")
    with pytest.raises(ClipgenError, match=r"malformed line in split file .*clipart_train.txt:\d+"):
        read_domainnet(dn_copy)


def test_unknown_class_in_split_file(dn_copy):
    lines = (dn_copy / "real_train.txt").read_text().splitlines()
    rel, label = lines[0].split()
    d, c, f = rel.split("/")
    (dn_copy / d / "unicorn").mkdir()
    shutil.copy(dn_copy / rel, dn_copy / d / "unicorn" / f)
    lines[0] = f"{d}/unicorn/{f} {label}"
    (dn_copy / "real_train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ClipgenError, match=r"unknown class 'unicorn' in split file .*real_train.txt:1"):
        read_domainnet(dn_copy)


def test_split_file_disagrees_with_folder(dn_copy):
    rel = (dn_copy / "painting_test.txt").read_text().split()[0]
    (dn_copy / rel).unlink()
    with pytest.raises(ClipgenError, match="which does not exist"):
        read_domainnet(dn_copy)


def test_unknown_domain_and_heldout_class(tiny_root, tmp_path):
    with pytest.raises(ClipgenError, match="invalid recipe.test_domain 'photo'"):
        build_recipe(make_cfg(tiny_root, "debug=smoke", "recipe.test_domain=photo"))
    with pytest.raises(ClipgenError, match="unknown DomainNet class 'unicorn'"):
        build_recipe(make_cfg(tiny_root, "debug=smoke", "heldout.classes=[axe,unicorn]"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission check needs a normal user")
def test_unwritable_root_in_process(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ClipgenError, match="not writable"):
        layout.root(make_cfg(ro, "debug=smoke"))


def test_cli_error_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = subprocess.run(["clipgen-world", f"paths.root={blocker}/sub", "debug=smoke"], capture_output=True,
                         text=True)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("clipgen: error: paths.root=") and "writable" in lines[0]
    out = subprocess.run(["clipgen-recipe", f"paths.root={tmp_path}/r", "debug=smoke", "data=domainnet",
                          f"data.domainnet_root={tmp_path}/nope", "data.base=none"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "is not a directory" in out.stderr


# --- values the schema's types hold but no run can use: one line naming the key, before any work -------------
@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", r"optim.lr=-1.0: expected a positive number"),
    ("optim.lr=nan", r"optim.lr=nan: expected a positive number"),
    ("trainer.epochs=0", r"trainer.epochs=0: expected a positive integer"),
    ("optim.warmup_steps=-5", r"optim.warmup_steps=-5: expected an integer >= 0"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1: expected a number >= 0"),
    ("data.workers=-1", r"data.workers=-1: expected an integer >= 0"),
    ("trainer.seed=-1", r"trainer.seed=-1: expected an integer >= 0"),
    ("recipe.seed=-1", r"recipe.seed=-1: expected an integer >= 0"),
    ("trainer.max_steps=0", r"trainer.max_steps=0: expected -1 \(the full schedule\) or a positive integer"),
])
def test_unusable_values_name_their_key_before_any_work(tmp_path, override, message):
    from clipgen.train.loop import run_train

    with pytest.raises(ClipgenError, match=f"^{message}$"):
        run_train(make_cfg(tmp_path, "debug=smoke", override))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "world").exists()


def test_study_and_eval_name_the_key_the_user_typed(tmp_path):
    from clipgen.eval.run import run_eval
    from clipgen.launch.study import run_study

    with pytest.raises(ClipgenError, match=r"^study.test_domains\[1\]='skech' \(in study.test_domains=\['sketch', "
                                           r"'skech'\]\): expected one of clipart, .* \(never real\)$"):
        run_study(make_cfg(tmp_path, "debug=smoke", "study.name=t", "study.test_domains=[sketch,skech]"))
    with pytest.raises(ClipgenError, match=r"^study.seeds\[1\]=-1 \(in study.seeds=\[0, -1\]\): expected an integer"):
        run_study(make_cfg(tmp_path, "debug=smoke", "study.name=t", "study.seeds=[0,-1]"))
    with pytest.raises(ClipgenError, match=r"^trainer.seed=-1: expected an integer >= 0$"):
        run_eval(make_cfg(tmp_path, "debug=smoke", "trainer.seed=-1"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "world").exists()


def test_unusable_value_on_the_command_line_is_one_line(tmp_path):
    out = subprocess.run(["clipgen-train", f"paths.root={tmp_path}", "debug=smoke", "optim.lr=-1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr == "clipgen: error: optim.lr=-1.0: expected a positive number\n"


def test_every_shipped_preset_holds_usable_values(tmp_path):
    from importlib import resources

    from clipgen.preflight import check_values

    conf = resources.files("clipgen.conf")
    presets = [f"{g}={f.name[:-5]}" for g in ("experiment", "debug") for f in conf.joinpath(g).iterdir()
               if f.name.endswith(".yaml")]
    assert "experiment=paper_grid" in presets and "debug=smoke" in presets
    for preset in presets:
        check_values(make_cfg(tmp_path, preset))
