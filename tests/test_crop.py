"""The fast training crop and decode path (clipgen.train.crop, decode_rgb) on a JPEG recipe of the tiny world at
96 px: within the documented tolerance of the grid_sample reference, and still bitwise the same batches through
both loaders, for any worker count, and on resume."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import loader_batches, same_batches, make_cfg
from PIL import Image

from clipgen.errors import ClipgenError
from clipgen.train.crop import CROP_TOLERANCE, SEPARABLE_MIN_PX, apply_crop, crop_normalize, normalize
from clipgen.train.data import EpochLoader, crop_theta, load_train_data
from clipgen.train.decode import decode_rgb, read_shard
from clipgen.train.stream import StreamLoader, load_stream_data

PX = 96  # above SEPARABLE_MIN_PX: the separable path; small enough for CI


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small ops run fastest on one thread


@pytest.fixture(scope="module")
def jpeg_recipe(tiny_root):
    """The tiny world's cg_high recipe written as 96 px JPEG shards (the world's images resized up)."""
    from clipgen.recipes.build import ensure_recipe

    rdir = ensure_recipe(make_cfg(tiny_root, "debug=smoke", "recipe=cg_high", f"recipe.image_px={PX}",
                                  "recipe.image_format=jpg"))
    return rdir, json.loads((rdir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def jpeg_data(jpeg_recipe, tokenizer):
    return load_train_data(jpeg_recipe[0], tokenizer, PX, workers=2)


def _reference(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """What the loaders computed before the separable crop: batched grid_sample, then normalise."""
    return normalize(apply_crop(images.float().div_(255.0), theta, size))


def test_separable_crop_matches_grid_sample(jpeg_data):
    g = torch.Generator().manual_seed(3)
    images = jpeg_data.images[:48]
    noise = torch.randint(0, 256, (16, 3, PX, PX), generator=g, dtype=torch.uint8)  # worst case: no smoothness
    for batch in (images, noise):
        theta = crop_theta(len(batch), g)
        got, want = crop_normalize(batch, theta, PX), _reference(batch, theta, PX)
        assert got.shape == want.shape == (len(batch), 3, PX, PX) and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= CROP_TOLERANCE
    # the whole image (identity box) comes back as the image itself, normalised (up to the float rounding of the
    # pixel positions, which grid_sample has too)
    whole = torch.eye(2, 3).expand(len(images), 2, 3)
    assert (crop_normalize(images, whole, PX) - normalize(images.float() / 255.0)).abs().max().item() < 5e-5
    # crops to another size (the box is resampled, not just cut out)
    theta = crop_theta(len(images), g)
    assert (crop_normalize(images, theta, 80) - _reference(images, theta, 80)).abs().max().item() <= CROP_TOLERANCE
    # a box that is not axis-aligned is not separable: the reference itself runs
    turned = theta.clone()
    turned[:, 0, 1] = 0.1
    assert torch.equal(crop_normalize(images, turned, PX), _reference(images, turned, PX))


def test_small_crops_keep_the_reference_bit_for_bit(jpeg_data):
    """The 32 px worlds' batches are unchanged: below SEPARABLE_MIN_PX the reference itself runs."""
    g = torch.Generator().manual_seed(4)
    small = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    theta = crop_theta(8, g)
    assert 32 < SEPARABLE_MIN_PX and torch.equal(crop_normalize(small, theta, 32), _reference(small, theta, 32))


def test_decoder_gives_pil_pixels(jpeg_recipe):
    shard = sorted(jpeg_recipe[0].glob("shard-*.tar"))[0]
    samples = read_shard(str(shard))[0]
    assert samples and all("jpg" in parts for _, parts, _ in samples)
    for _, parts, _ in samples[:40]:
        with Image.open(io.BytesIO(parts["jpg"])) as im:
            want = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        got = decode_rgb(parts["jpg"])
        assert got.dtype == np.uint8 and got.shape == (3, PX, PX) and np.array_equal(got, want)


@pytest.mark.slow
def test_jpeg_batches_identical_across_loaders_workers_and_resume(jpeg_recipe, jpeg_data, tokenizer):
    memory = EpochLoader(jpeg_data, 32, seed=7, image_px=PX)
    want = loader_batches(memory)
    assert want and want[0][3].shape == (32, 3, PX, PX)
    # the batch is the reference crop of the decoded images, up to CROP_TOLERANCE
    e, i, idx, images, _ = want[1]
    theta = crop_theta(32, torch.Generator().manual_seed(_aug_seed(7, e, i)))
    assert (images - _reference(jpeg_data.images[idx], theta, PX)).abs().max().item() <= CROP_TOLERANCE
    stream = load_stream_data(jpeg_recipe[0], PX, workers=2)
    for workers in (0, 2):
        assert same_batches(loader_batches(StreamLoader(stream, 32, 7, PX, tokenizer, workers=workers)), want)
    k = 2  # a resumed run, from (epoch 0, batch k)
    tail = loader_batches(StreamLoader(stream, 32, 7, PX, tokenizer, workers=2), ((0, k), (1, 0)))
    assert same_batches(tail, want[k:])
    assert same_batches(loader_batches(EpochLoader(jpeg_data, 32, seed=7, image_px=PX), ((0, k), (1, 0))), want[k:])


def _aug_seed(seed: int, epoch: int, index: int) -> int:
    from clipgen.train.data import derive_seed

    return derive_seed("aug", seed, epoch, index)


def test_damaged_jpeg_is_a_bad_sample(jpeg_recipe, tokenizer, tmp_path):
    """A JPEG cut short (libjpeg only warns; the strict decoder refuses it, as PIL does) is reported like any bad
    image: an error naming the shard and the key, or skipped and counted."""
    import shutil
    import tarfile

    rdir, manifest = jpeg_recipe
    copy = tmp_path / rdir.name
    shutil.copytree(rdir, copy)
    base = (rdir / manifest["base"]["dir"]).resolve()
    shutil.copytree(base, tmp_path / base.name)
    shard = copy / sorted(manifest["shards"])[0]
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    victim = [n for n, _ in members if n.endswith(".jpg")][3]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            data = data[:len(data) // 2] if name == victim else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    key = victim.split(".", 1)[0]
    with pytest.raises(ClipgenError, match=rf"shard-00000\.tar.*'{key}'.*cannot be decoded.*Premature end"):
        load_train_data(copy, tokenizer, PX)
    data = load_stream_data(copy, PX, on_bad_sample="skip")
    assert data.num_skipped == 1 and data.bad_samples[0]["key"] == key
