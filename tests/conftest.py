"""Shared fixtures: compose the real config tree with Hydra's compose API into a temporary paths.root."""
from __future__ import annotations

import os

import pytest
from omegaconf import DictConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from clipgen.config import compose_config, register_configs  # noqa: E402

register_configs()


def make_cfg(root, *overrides: str) -> DictConfig:
    """The config a console script would see for ``clipgen-x paths.root=<root> <overrides>``."""
    return compose_config([f"paths.root={root}", *overrides])


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A paths.root shared by the session, holding the tiny world (generated once)."""
    root = tmp_path_factory.mktemp("clipgen_root")
    from clipgen.world.generate import generate_world

    generate_world(make_cfg(root, "debug=smoke"))
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's ops are too small to gain from a second thread, and on a shared 2-core machine OpenMP's
    spin-waiting makes them ~10x slower under load; the setting is restored for other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_name_of(root, recipe_id: str, *overrides: str) -> str:
    """The run directory name clipgen gives ``recipe_id`` under these overrides (names carry the settings)."""
    from clipgen.rundir import run_name

    return run_name(make_cfg(root, *overrides), recipe_id)
