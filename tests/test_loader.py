"""The training loader on the tiny world's recipe: parallel decode (same data for any worker count), bad samples
(error naming shard and key, or skip and count), the memory guard, DDP shares and exact mid-epoch resume."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import loader_batches, same_batches, make_cfg

from clipgen.errors import ClipgenError
from clipgen.train import decode
from clipgen.train.data import EpochLoader, bad_samples_report, load_train_data
from clipgen.train.loop import run_train

SMOKE = ("debug=smoke", "recipe=cg_high", "trainer.threads=1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small ops run fastest on one thread


@pytest.fixture(scope="module")
def tiny_recipe(tiny_root):
    from clipgen.recipes.build import ensure_recipe

    rdir = ensure_recipe(make_cfg(tiny_root, *SMOKE))
    return rdir, json.loads((rdir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_data(tiny_recipe, tokenizer):
    return load_train_data(tiny_recipe[0], tokenizer, 32, workers=2)


def _copy_recipe(rdir: Path, manifest: dict, dest: Path) -> tuple[Path, Path]:
    """A writable copy of a recipe and its base corpus (at the same relative place); returns both dirs."""
    shutil.copytree(rdir, dest / rdir.name)
    base = (rdir / manifest["base"]["dir"]).resolve()
    shutil.copytree(base, dest / base.name)
    return dest / rdir.name, dest / base.name


@pytest.fixture
def recipe_copy(tiny_recipe, tmp_path):
    rdir, manifest = tiny_recipe
    return (*_copy_recipe(rdir, manifest, tmp_path), manifest)


def _keys(shard: Path) -> list[str]:
    with tarfile.open(shard) as tf:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tf if m.isfile()))


def _rewrite(shard: Path, edit) -> None:
    """Rewrite a shard with ``edit(name, bytes) -> bytes | None`` applied to every member (None drops it)."""
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _total(manifest: dict) -> int:
    return manifest["num_samples"] + manifest["base"]["num_samples"]


def _same_data(a, b) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) and a.meta == b.meta
            and (a.num_recipe, a.num_base, a.bad_samples) == (b.num_recipe, b.num_base, b.bad_samples))


def test_worker_count_does_not_change_the_data(tiny_recipe, tiny_data, tokenizer):
    rdir, manifest = tiny_recipe
    serial = load_train_data(rdir, tokenizer, 32, workers=0)
    assert _same_data(serial, tiny_data) and len(serial) == _total(manifest)
    assert (serial.num_recipe, serial.num_base) == (manifest["num_samples"], manifest["base"]["num_samples"])
    ids = serial.meta["sample_id"]
    assert ids[:serial.num_recipe] == sorted(ids[:serial.num_recipe])  # canonical order: by sample id
    assert all(i.startswith("base/") for i in ids[serial.num_recipe:]) and serial.bad_samples == []


def test_fast_tar_reader_matches_tarfile(tiny_recipe, tmp_path):
    rdir, manifest = tiny_recipe
    shard = rdir / sorted(manifest["shards"])[0]
    fast = decode.read_shard(str(shard))
    assert decode._ustar_members(shard.read_bytes()) is not None  # our shards take the fast path ...
    assert fast == decode._group(decode._tarfile_members(str(shard))) and fast[1] is None  # ... with tarfile's result
    pax = tmp_path / "pax.tar"  # a name over 100 characters needs a pax header: read by tarfile instead
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tf:
        for key, parts, _ in fast[0][:2]:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{'d' * 120}/{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    slow, failure = decode.read_shard(str(pax))
    assert decode._ustar_members(pax.read_bytes()) is None and failure is None
    assert [(k, p) for k, p, _ in slow] == [(k, p) for k, p, _ in fast[0][:2]]
    for key, parts, where in fast[0]:  # the offsets say where each member's bytes are in the tar
        with open(shard, "rb") as f:
            for ext, data in parts.items():
                f.seek(where[ext])
                assert f.read(len(data)) == data


@pytest.mark.slow
def test_corrupt_image_and_missing_parts(recipe_copy, tokenizer):
    rdir, base_dir, manifest = recipe_copy
    shards = [rdir / name for name in sorted(manifest["shards"])]
    bad_png, no_json = _keys(shards[1])[2], _keys(shards[0])[5]
    _rewrite(shards[1], lambda n, d: b"\x89PNG not really" if n == f"{bad_png}.png" else d)
    _rewrite(shards[0], lambda n, d: None if n == f"{no_json}.json" else d)
    # Default: an error naming the shard file and the key; with two bad shards, the first in shard order.
    for workers in (0, 2):
        with pytest.raises(ClipgenError, match=rf"shard-00000\.tar.*'{no_json}'.*\.json") as err:
            load_train_data(rdir, tokenizer, 32, workers=workers)
        assert str(rdir) in str(err.value) and "\n" not in str(err.value)

    data = load_train_data(rdir, tokenizer, 32, workers=2, on_bad_sample="skip")
    assert len(data) == _total(manifest) - 2 and data.num_skipped == 2
    assert [(b["shard"], b["key"], b["count"]) for b in data.bad_samples] == [
        (f"{rdir.name}/shard-00000.tar", no_json, 1), (f"{rdir.name}/shard-00001.tar", bad_png, 1)]
    assert "cannot be decoded" in data.bad_samples[1]["reason"]
    assert _same_data(data, load_train_data(rdir, tokenizer, 32, workers=0, on_bad_sample="skip"))
    report = bad_samples_report(data, limit=1)
    assert report["count"] == 2 and len(report["samples"]) == 1 and report["not_listed"] == 1
    # The manifest check allows exactly the skipped number, no more.
    with pytest.raises(ClipgenError, match=r"\+2 skipped.*expected"):
        load_train_data(rdir, tokenizer, 32, {**manifest, "num_samples": manifest["num_samples"] + 1},
                        on_bad_sample="skip")


@pytest.mark.slow
def test_truncated_tars(recipe_copy, tokenizer):
    rdir, base_dir, manifest = recipe_copy
    shard = rdir / sorted(manifest["shards"])[1]
    raw, keys = shard.read_bytes(), _keys(shard)
    shard.write_bytes(raw[:len(raw) // 2])  # cut inside a member
    with pytest.raises(ClipgenError, match=r"shard-00001\.tar.*sample '\d{8}'.*truncated") as err:
        load_train_data(rdir, tokenizer, 32, workers=2)
    assert err.value.args[0].split("sample '")[1][:8] in keys
    # A base shard cut exactly at a sample boundary reads as a shorter tar: caught by the per-shard count.
    bshard = base_dir / sorted(manifest["base"]["shards"])[0]
    with tarfile.open(bshard) as tf:
        cut = [m for m in tf][3 * 3].offset  # header of the 4th sample's first member
    bshard.write_bytes(bshard.read_bytes()[:cut])
    data = load_train_data(rdir, tokenizer, 32, workers=2, on_bad_sample="skip")
    by_shard = {b["shard"]: b for b in data.bad_samples}
    lost = manifest["base"]["shards"][bshard.name] - 3
    assert by_shard[f"{base_dir.name}/{bshard.name}"]["count"] == lost
    assert len(data) + data.num_skipped == _total(manifest) and data.num_base == manifest["base"]["num_samples"] - lost
    shard.write_bytes(raw)
    with pytest.raises(ClipgenError, match=rf"{bshard.name}.*'00000002'.*manifest lists"):
        load_train_data(rdir, tokenizer, 32)


def test_bad_samples_reach_the_run_meta(tiny_root, tmp_path):
    from clipgen.recipes.build import ensure_recipe

    shutil.copytree(Path(tiny_root) / "world", tmp_path / "world")
    cfg = make_cfg(tmp_path, *SMOKE, "run_name=test-loader-skip", "trainer.max_steps=1")
    rdir = ensure_recipe(cfg)
    shard = rdir / "shard-00000.tar"
    key = _keys(shard)[0]
    _rewrite(shard, lambda n, d: d[:40] if n == f"{key}.png" else d)  # a truncated PNG
    with pytest.raises(ClipgenError, match=rf"shard-00000\.tar.*'{key}'.*on_bad_sample=skip"):
        run_train(cfg)
    out = run_train(make_cfg(tmp_path, *SMOKE, "run_name=test-loader-skip", "trainer.max_steps=1",
                             "data.on_bad_sample=skip"))
    meta = json.loads((Path(out["run_dir"]) / "meta.json").read_text())
    assert meta["bad_samples"]["count"] == 1 and meta["bad_samples"]["samples"][0]["key"] == key
    assert meta["num_samples"]["recipe"] == json.loads((rdir / "manifest.json").read_text())["num_samples"] - 1
    with pytest.raises(ClipgenError, match="data.on_bad_sample"):
        run_train(make_cfg(tmp_path / "other", *SMOKE, "data.on_bad_sample=ignore"))
    assert not (tmp_path / "other").exists()  # rejected before anything was built


def test_memory_guard(tiny_recipe, tokenizer):
    rdir, manifest = tiny_recipe
    need = _total(manifest) * 3 * 32 * 32
    with pytest.raises(ClipgenError, match=r"in-memory loader.*worlds and small px") as err:
        load_train_data(rdir, tokenizer, 32, max_memory_gb=need / 2e9)
    assert f"{_total(manifest)} samples x 3 x 32 x 32" in str(err.value)
    assert len(load_train_data(rdir, tokenizer, 32, max_memory_gb=need * 1.01 / 1e9)) == _total(manifest)


def test_ranks_split_every_global_batch(tiny_data):
    single = EpochLoader(tiny_data, 64, seed=3, image_px=32)
    ranks = [EpochLoader(tiny_data, 64, seed=3, image_px=32, rank=r, world_size=2) for r in range(2)]
    assert ranks[1].steps_per_epoch == single.steps_per_epoch and ranks[1].local_batch_size == 32
    for epoch in (0, 1):
        for one, *shares in zip(single.batches(epoch), *(r.batches(epoch) for r in ranks)):
            a, b = (s.indices.tolist() for s in shares)
            assert not set(a) & set(b) and len(a) == len(b) == 32
            assert a + b == one.indices.tolist()
            assert torch.equal(torch.cat([s.images for s in shares]), one.images)  # augmentation included
            assert torch.equal(torch.cat([s.tokens for s in shares]), one.tokens)
    with pytest.raises(ClipgenError, match="batch_size=33.*multiple of 2"):
        EpochLoader(tiny_data, 33, 0, 32, rank=0, world_size=2)
    with pytest.raises(ClipgenError, match="rank 2 of world size 2"):
        EpochLoader(tiny_data, 64, 0, 32, rank=2, world_size=2)


def test_sample_level_mixing_and_exact_mid_epoch_resume(tiny_recipe, tiny_data, tokenizer):
    def run(loader, epoch, start, epochs=2):
        return [(b.epoch, b.index, b.indices, b.images, b.tokens)
                for e in range(epoch, epochs) for b in loader.batches(e, start if e == epoch else 0)]

    loader = EpochLoader(tiny_data, 32, seed=0, image_px=32)
    full = run(loader, 0, 0)
    epoch0 = torch.cat([b[2] for b in full if b[0] == 0])
    assert len(set(epoch0.tolist())) == loader.samples_per_epoch  # one permutation: no sample twice
    mixed = [((b[2] < tiny_data.num_recipe).any() and (b[2] >= tiny_data.num_recipe).any()).item() for b in full]
    assert sum(mixed) >= len(full) - 1  # recipe and base interleave within batches, not by shard
    # "Resume": freshly decoded data and a new loader, started at (epoch 0, batch 4) as latest.pt would say.
    again = load_train_data(tiny_recipe[0], tokenizer, 32, workers=0)
    for k in (4, loader.steps_per_epoch - 1):
        tail = run(EpochLoader(again, 32, seed=0, image_px=32), 0, k)
        expected = full[k:]
        assert len(tail) == len(expected)
        for got, want in zip(tail, expected):
            assert got[:2] == want[:2] and all(torch.equal(x, y) for x, y in zip(got[2:], want[2:]))
    # The same holds for one rank's share.
    rank1 = run(EpochLoader(tiny_data, 32, 0, 32, rank=1, world_size=2), 1, 2)
    assert all(torch.equal(r[2], f[2][16:]) and torch.equal(r[3], f[3][16:])
               for r, f in zip(rank1, [b for b in full if b[0] == 1][2:]))


# --- streaming loader (clipgen.train.stream): the same batches, read from the shards as they are needed ---

@pytest.mark.slow
def test_stream_loader_gives_the_in_memory_batches(tiny_recipe, tiny_data, tokenizer):
    from clipgen.train.stream import StreamLoader, load_stream_data

    stream = load_stream_data(tiny_recipe[0], 32, workers=2)
    assert (len(stream), stream.num_recipe, stream.num_base) == (len(tiny_data), tiny_data.num_recipe,
                                                                 tiny_data.num_base)
    assert stream.meta == tiny_data.meta and stream.bad_samples == []
    want = loader_batches(EpochLoader(tiny_data, 32, seed=5, image_px=32))
    for workers in (0, 2):  # DataLoader workers or in-process: the data are identical, bit for bit
        assert same_batches(loader_batches(StreamLoader(stream, 32, 5, 32, tokenizer, workers=workers)), want)
    # exact mid-epoch resume and disjoint rank shares, as the in-memory loader
    k = 3
    tail = loader_batches(StreamLoader(stream, 32, 5, 32, tokenizer, workers=2), ((0, k), (1, 0)))
    assert same_batches(tail, want[k:])
    rank1 = loader_batches(StreamLoader(stream, 32, 5, 32, tokenizer, rank=1, world_size=2, workers=2))
    mem1 = loader_batches(EpochLoader(tiny_data, 32, 5, 32, rank=1, world_size=2))
    assert same_batches(rank1, mem1) and all(torch.equal(r[2], w[2][16:]) for r, w in zip(rank1, want))


def test_stream_loader_bad_samples_and_changed_shards(recipe_copy, tokenizer):
    from clipgen.train.stream import StreamLoader, load_stream_data

    rdir, base_dir, manifest = recipe_copy
    shards = [rdir / name for name in sorted(manifest["shards"])]
    bad_png = _keys(shards[1])[2]
    _rewrite(shards[1], lambda n, d: b"\x89PNG not really" if n == f"{bad_png}.png" else d)
    with pytest.raises(ClipgenError, match=rf"shard-00001\.tar.*'{bad_png}'.*cannot be decoded"):
        load_stream_data(rdir, 32, workers=2)
    stream = load_stream_data(rdir, 32, workers=2, on_bad_sample="skip")
    memory = load_train_data(rdir, tokenizer, 32, workers=0, on_bad_sample="skip")
    assert stream.bad_samples == memory.bad_samples and stream.meta == memory.meta
    assert same_batches(loader_batches(StreamLoader(stream, 32, 0, 32, tokenizer, workers=0), ((0, 0),)),
                  loader_batches(EpochLoader(memory, 32, 0, 32), ((0, 0),)))
    # A shard overwritten after the check: the batch that reads it fails naming the shard and the sample.
    raw = shards[0].read_bytes()
    shards[0].write_bytes(raw[:4096])
    with pytest.raises(ClipgenError, match=r"shard-00000\.tar.*changed while training"):
        loader_batches(StreamLoader(stream, 32, 0, 32, tokenizer, workers=2), ((0, 0),))


def test_auto_loader_streams_what_does_not_fit(tiny_recipe, tiny_root):
    from clipgen.train.stream import choose_loader

    rdir, manifest = tiny_recipe
    need = _total(manifest) * 3 * 32 * 32 / 1e9
    data_cfg = make_cfg(tiny_root, *SMOKE).data
    assert data_cfg.loader == "auto"
    for max_gb, kind in ((need * 1.01, "memory"), (need / 2, "stream")):
        data_cfg.max_memory_gb = max_gb
        assert choose_loader(data_cfg, rdir, manifest, 32) == kind
    data_cfg.loader = "disk"
    with pytest.raises(ClipgenError, match="data.loader 'disk'.*auto, memory, stream"):
        choose_loader(data_cfg, rdir, manifest, 32)


def test_make_loader_builds_the_chosen_loader_the_trainer_and_benchmarks_share(tiny_recipe, tiny_root, tokenizer):
    from clipgen.train.stream import StreamLoader, make_loader

    rdir, manifest = tiny_recipe
    cfg = make_cfg(tiny_root, *SMOKE)
    need = _total(manifest) * 3 * 32 * 32 / 1e9
    built = {}
    for max_gb, kind, cls in ((need * 1.01, "memory", EpochLoader), (need / 2, "stream", StreamLoader)):
        cfg.data.max_memory_gb = max_gb
        got, data, loader = make_loader(cfg, rdir, manifest, tokenizer)
        assert (got, type(loader), len(data)) == (kind, cls, _total(manifest))
        assert loader.batch_size == cfg.trainer.batch_size
        built[kind] = loader_batches(loader, ((0, 0),))
    assert same_batches(built["memory"], built["stream"])  # either loader: the same training batches
