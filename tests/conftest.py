"""Shared fixtures: compose the real config tree with Hydra's compose API into a temporary paths.root."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil

import pytest
from omegaconf import DictConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `-n N` workers share the machine's cores: each worker's torch, and the OpenMP of every process its tests
    # start, get an N-th of them. Otherwise each tiny op spreads over every core and spin-waits for a core that the
    # other worker holds. An OMP_NUM_THREADS of the user's own is kept.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

from clipgen.config import compose_config, copy_config, register_configs  # noqa: E402

register_configs()


# The files that take longest (wall time, with their waits on subprocesses and the SLURM cluster), longest first.
# The README's `-n 2 --dist loadfile` hands whole files to the workers in collection order (pyproject's addopts
# turn off xdist's reordering by test count), so these start first and the many short files even out the end.
LONGEST_FIRST = ("test_cluster.py", "test_rehearsal.py", "test_analyze.py", "test_faults.py", "test_run_identity.py",
                 "test_diff.py", "test_study.py", "test_world.py", "test_diff_compare.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


def make_cfg(root, *overrides: str) -> DictConfig:
    """The config a console script would see for ``clipgen-x paths.root=<root> <overrides>``.

    Hydra composes each distinct list of overrides once per test process (~0.1-0.2 CPU s a composition, several
    hundred of them in a suite run); each caller gets its own copy (~5 ms) with its ``paths.root`` set, which is
    what the command-line override does: it wins over every preset, and every other path interpolates it lazily.
    tests/test_config.py checks that this is the config composing with ``paths.root=<root>`` gives."""
    if any(o.lstrip("~+").startswith("paths") for o in overrides):
        return compose_config([f"paths.root={root}", *overrides])
    cfg = copy_config(_composed(tuple(overrides)))
    cfg.paths.root = str(root)
    return cfg


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose_config(list(overrides))


@contextlib.contextmanager
def scratch_dir(tmp_path_factory, name: str):
    """A module or session fixture's directory, deleted when the fixture ends. pytest itself deletes only the
    tmp_path of passed tests (tmp_path_retention_policy in pyproject.toml); trained runs would otherwise stay."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A paths.root shared by the session, holding the tiny world (generated once)."""
    from clipgen.world.generate import generate_world

    with scratch_dir(tmp_path_factory, "clipgen_root") as root:
        generate_world(make_cfg(root, "debug=smoke"))
        yield root


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's ops are too small to gain from a second thread, and on a shared 2-core machine OpenMP's
    spin-waiting makes them ~10x slower under load; the setting is restored for other modules."""
    from clipgen.procs import torch_threads

    with torch_threads(1):
        yield


def run_name_of(root, recipe_id: str, *overrides: str) -> str:
    """The run directory name clipgen gives ``recipe_id`` under these overrides (names carry the settings)."""
    from clipgen.rundir import run_name

    return run_name(make_cfg(root, *overrides), recipe_id)


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny models' tokenizer (open_clip's, over clipgen's compact vocabulary)."""
    from clipgen.models.factory import create_clip

    return create_clip("clipgen-tiny-rn", 32)[1]


def loader_batches(loader, epochs=((0, 0), (1, 0))):
    """(epoch, index, sample indices, images, tokens) of every batch a loader gives for (epoch, start batch) pairs."""
    return [(b.epoch, b.index, b.indices, b.images, b.tokens) for e, start in epochs for b in loader.batches(e, start)]


def same_batches(xs, ys) -> bool:
    """Two loader_batches() lists are equal bit for bit."""
    import torch

    return len(xs) == len(ys) and all(x[:2] == y[:2] and all(torch.equal(a, b) for a, b in zip(x[2:], y[2:]))
                                      for x, y in zip(xs, ys))


@pytest.fixture(scope="module")
def tiny_rn():
    """A tiny ModifiedResNet CLIP with random BN statistics and biases, so it is far from linear (the analyses'
    attribution and circuit tests)."""
    import torch

    from clipgen.models.factory import create_clip

    torch.manual_seed(0)
    model, _ = create_clip("clipgen-tiny-rn", 32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.visual.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.normal_(1, 0.3, generator=g)
                mod.bias.normal_(0, 0.3, generator=g)
                mod.running_mean.normal_(0, 0.3, generator=g)
    return model.eval()
