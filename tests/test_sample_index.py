"""The sample index (clipgen.data.sampleindex): written with a recipe's shards, memory-mapped by every launch and
worker of the streaming loader instead of reading the shards; a changed shard is noticed and checked again, and
what a DataLoader worker receives does not grow with the recipe."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import loader_batches, make_cfg, same_batches

from clipgen.data import sampleindex
from clipgen.errors import ClipgenError
from clipgen.recipes.build import ensure_recipe
from clipgen.train import stream
from clipgen.train.data import EpochLoader, load_train_data
from clipgen.train.stream import StreamLoader, load_stream_data, make_loader

SMOKE = ("debug=smoke", "recipe=cg_high", "trainer.threads=1")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def recipe(tiny_root):
    rdir = ensure_recipe(make_cfg(tiny_root, *SMOKE))
    return rdir, json.loads((rdir / "manifest.json").read_text())


@pytest.fixture
def recipe_copy(recipe, tmp_path):
    """A writable copy of the recipe and its base corpus (shutil.copytree keeps the files' mtimes, so the indexes
    written with the shards stay current for the copies)."""
    rdir, manifest = recipe
    base = (rdir / manifest["base"]["dir"]).resolve()
    shutil.copytree(rdir, tmp_path / rdir.name)
    shutil.copytree(base, tmp_path / base.name)
    return tmp_path / rdir.name, tmp_path / base.name, manifest


def _no_shard_reads(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a shard was read to find out what it holds")
    monkeypatch.setattr(stream, "index_shards", refuse)


def test_the_recipe_build_writes_the_index_and_a_launch_reads_no_shard(recipe, tokenizer, monkeypatch):
    rdir, manifest = recipe
    base = (rdir / manifest["base"]["dir"]).resolve()
    for d, n in ((rdir, manifest["num_samples"]), (base, manifest["base"]["num_samples"])):
        (index,) = list(d.glob(f"{sampleindex.INDEX_PREFIX}*"))
        header = json.loads((index / sampleindex.HEADER).read_text())
        assert header["built_by"] == "writer" and header["num_samples"] == n and header["bad"] == []
    _no_shard_reads(monkeypatch)
    data = load_stream_data(rdir, 32, workers=2)
    memory = load_train_data(rdir, tokenizer, 32, workers=0)
    assert data.meta == memory.meta and (data.num_recipe, data.num_base) == (memory.num_recipe, memory.num_base)
    want = loader_batches(EpochLoader(memory, 32, seed=2, image_px=32), ((0, 0),))
    assert same_batches(loader_batches(StreamLoader(data, 32, 2, 32, tokenizer, workers=2), ((0, 0),)), want)


def test_a_checked_index_equals_the_written_one(recipe_copy, monkeypatch):
    """Shards without an index (an older clipgen's recipe) are checked once and get the same index."""
    rdir, base_dir, _ = recipe_copy
    written = load_stream_data(rdir, 32)
    for d in (rdir, base_dir):
        for index in d.glob(f"{sampleindex.INDEX_PREFIX}*"):
            shutil.rmtree(index)
    checked = load_stream_data(rdir, 32, workers=2)
    assert [json.loads((ix.path / sampleindex.HEADER).read_text())["built_by"] for ix in checked.sets] == ["check"] * 2
    for a, b in zip(written.sets, checked.sets):
        for name in sampleindex.NUMERIC + sampleindex.CATEGORICAL:
            assert np.array_equal(a.column(name), b.column(name)), name
        assert a.tables == b.tables
    assert written.meta == checked.meta
    _no_shard_reads(monkeypatch)  # and the next launch uses it
    assert load_stream_data(rdir, 32).sets[0].path == checked.sets[0].path


def test_a_rewritten_shard_is_checked_again(recipe_copy, tokenizer):
    rdir, _, manifest = recipe_copy
    shard = rdir / sorted(manifest["shards"])[0]
    old = load_stream_data(rdir, 32).sets[0].path
    raw = shard.read_bytes()
    shard.write_bytes(raw)  # the same bytes, a new mtime: checked again (decoding every image), same content
    new = load_stream_data(rdir, 32).sets[0].path
    assert new != old and not old.exists() and json.loads((new / sampleindex.HEADER).read_text())["built_by"] == "check"
    # A change that keeps size and mtime is caught at the read: one line naming shard and sample, index dropped.
    st = os.stat(shard)
    data = load_stream_data(rdir, 32)
    ix = data.sets[0]
    row = int(np.flatnonzero(ix.column("shard") == 0)[0])
    at, n = int(ix.column("offset")[row]), int(ix.column("nbytes")[row])
    patched = bytearray(raw)
    patched[at + n - 20] ^= 0xFF  # inside the image's bytes
    shard.write_bytes(bytes(patched))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    loader = StreamLoader(data, len(data), 0, 32, tokenizer, workers=0, augment=False)
    with pytest.raises(ClipgenError, match=r"sample '.*' \(key '\d{8}'\) in shard '.*shard-00000\.tar'.*changed "
                                           "while training") as err:
        next(loader.batches(0))
    assert "\n" not in str(err.value) and not (ix.path / sampleindex.HEADER).exists()
    with pytest.raises(ClipgenError, match=r"shard-00000\.tar.*cannot be decoded"):
        load_stream_data(rdir, 32)  # the next launch checks the shard and finds the damaged image


def test_a_worker_receives_paths_not_data(recipe, tiny_root, tokenizer):
    rdir, manifest = recipe
    cfg = make_cfg(tiny_root, *SMOKE, "data.loader=stream", "model=tiny_rn")
    kind, data, loader = make_loader(cfg, rdir, manifest, tokenizer)
    assert kind == "stream" and len(data) > 300
    data.labels = torch.zeros(len(data), dtype=torch.int64)  # never sent to workers
    blob = pickle.dumps(stream._Batches(loader))
    assert len(blob) < 16_000, len(blob)  # paths and numbers; the tokenizer travels as its model's name
    copy = pickle.loads(blob).loader
    assert copy.data.labels is None and copy.data.captions([0, len(data) - 1]) == data.captions([0, len(data) - 1])
    assert copy.tokenizer(["a sketch of a cat"]).tolist() == tokenizer(["a sketch of a cat"]).tolist()


def test_supervised_targets_from_the_columns_equal_the_metadata_ones(recipe, tokenizer):
    from clipgen.train.objective import data_labels

    rdir, _ = recipe
    streamed = data_labels(load_stream_data(rdir, 32), rdir)
    assert streamed.tolist() == data_labels(load_train_data(rdir, tokenizer, 32), rdir).tolist()


def test_shard_writing_is_the_same_for_any_worker_count(tiny_root, tmp_path, monkeypatch):
    from clipgen.data.sources import base_index
    from clipgen.recipes import shards
    from clipgen.recipes.shards import write_shard_set

    monkeypatch.setattr(shards, "SERIAL_BELOW", 0)  # a pool even for these few samples

    samples = base_index(make_cfg(tiny_root, *SMOKE))[:120]
    captions = [s.caption for s in samples]
    out = {}
    for workers in (1, 2):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        sizes, columns = write_shard_set(d, samples, captions, 32, "jpg", 25, 2, workers=workers, quality=90)
        out[workers] = (sizes, {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}, columns)
    assert out[1][0] == out[2][0] and out[1][1] == out[2][1] and len(out[1][1]) == 5
    assert [c.crc.tolist() for c in out[1][2]] == [c.crc.tolist() for c in out[2][2]]
