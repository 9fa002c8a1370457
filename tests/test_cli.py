"""The console scripts' own flags, run as a user runs them (subprocess): --version names clipgen's version and
Hydra's --info / --cfg still work next to the job name that every app adds to its command line."""
from __future__ import annotations

import subprocess

import clipgen


def _run(*args, cwd):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def test_version_prints_clipgens_version(tmp_path):
    out = _run("clipgen-report", "--version", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(f"clipgen-report (clipgen {clipgen.__version__}, Hydra ")


def test_info_works_alone_and_with_overrides(tmp_path):
    out = _run("clipgen-report", "--info", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Installed Hydra Plugins" in out.stdout
    out = _run("clipgen-train", "--info", "config", f"paths.root={tmp_path}/r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"root: {tmp_path}/r" in out.stdout


def test_job_name_is_still_the_apps_with_flags_first_or_last(tmp_path):
    for args in (["--cfg", "hydra"], [f"paths.root={tmp_path}", "--cfg", "hydra"]):
        out = _run("clipgen-eval", *args, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "name: clipgen-eval" in out.stdout
    assert not list(tmp_path.iterdir())  # printing a config writes nothing
