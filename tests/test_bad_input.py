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
