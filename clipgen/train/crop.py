"""The training crop: RandomResizedCrop boxes applied to a uint8 batch, then the CLIP normalisation.

``apply_crop`` is the reference: ``affine_grid`` + ``grid_sample`` (bicubic, border padding) over the whole
batch. A crop box is axis-aligned (scale and shift, no rotation), so the bicubic resampling is separable: each
output pixel is the 4x4 tap sum ``sum_i sum_j wy_i wx_j v[clamp(y_i), clamp(x_j)]`` that grid_sample computes,
done as one 4-tap pass along x and one along y. ``crop_normalize`` does that on CPU, one image at a time so that
the image, its passes and its output stay in the CPU cache, and converts to float, clamps and normalises in the
same pass: at 224 px it costs about a quarter of the batched grid_sample (benchmarks/loader_jpeg224.py).

Tolerance: the taps and weights are grid_sample's (same cubic convolution, A = -0.75; same border clamping), but
float32 rounding differs (coordinates are computed in a different order and the sums are grouped per axis). The
normalised outputs agree with the reference to within ``CROP_TOLERANCE`` (tests/test_crop.py checks it on the
world's images and on noise, the worst case). Both loaders use the same function, so they still give bitwise the
same batches on CPU, and a resumed run bitwise the batches of an uninterrupted one. On other devices, and for
crops under ``SEPARABLE_MIN_PX`` (the 32 px worlds, whose batches stay bitwise what they were), ``crop_normalize``
runs the batched reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CUBIC_A = -0.75  # grid_sample's cubic convolution coefficient (PIL's bicubic uses -0.5)
CROP_TOLERANCE = 1e-4  # max |separable - grid_sample| after normalisation (values span about -1.8 .. 2.2)
SEPARABLE_MIN_PX = 64  # below this the per-image loop's overhead outweighs its saving (32 px: 2x slower)


def _mean_std(device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return (torch.tensor(OPENAI_DATASET_MEAN, device=device, dtype=dtype).view(-1, 1, 1),
            torch.tensor(OPENAI_DATASET_STD, device=device, dtype=dtype).view(-1, 1, 1))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP's mean/std normalisation of a float batch in [0, 1]."""
    mean, std = _mean_std(images.device, images.dtype)
    return (images - mean) / std


def apply_crop(images: torch.Tensor, theta: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Crop-and-resize a float batch in [0, 1] to ``size`` x ``size`` with one ``crop_theta`` matrix per image."""
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots


def cubic_taps(scale: torch.Tensor, shift: torch.Tensor, size: int, in_size: int) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """Source indices (b x size x 4, int64, border-clamped) and weights (b x size x 4, float32) along one axis,
    for output pixel centres mapped to the input by ``x_in = scale * x_out + shift`` in [-1, 1] coordinates
    (affine_grid's convention, align_corners=False)."""
    centres = torch.linspace(-1.0, 1.0, size) * (size - 1) / size  # affine_grid's base grid
    x = centres[None, :] * scale[:, None] + shift[:, None]
    pos = ((x + 1) * in_size - 1) / 2  # grid_sample's unnormalisation, align_corners=False
    first = torch.floor(pos)
    t = pos - first
    a, t1, t2 = CUBIC_A, t + 1, 1 - t
    t3 = t2 + 1  # grid_sample's grouping of the rounding
    weights = torch.stack([((a * t1 - 5 * a) * t1 + 8 * a) * t1 - 4 * a,
                           ((a + 2) * t - (a + 3)) * t * t + 1,
                           ((a + 2) * t2 - (a + 3)) * t2 * t2 + 1,
                           ((a * t3 - 5 * a) * t3 + 8 * a) * t3 - 4 * a], dim=-1)
    index = (first.long()[..., None] + torch.arange(-1, 3)).clamp_(0, in_size - 1)  # border padding
    return index, weights


def _taps_pass(src: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[c, j, :] = sum_k weights[j, k] * src[c, index[j, k], :] (4 taps along dim 1)."""
    torch.mul(src.index_select(1, index[:, 0]), weights[:, 0, None], out=out)
    for k in range(1, 4):
        out.addcmul_(src.index_select(1, index[:, k]), weights[:, k, None])
    return out


def crop_normalize(images: torch.Tensor, theta: torch.Tensor, size: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 batch (b x c x h x w) -> cropped (``crop_theta`` boxes: scale + shift, no rotation), resized to
    ``size`` x ``size`` bicubic, clamped to [0, 1] and normalised: float32 b x c x size x size, written into ``out``
    when given (a DataLoader worker passes shared memory: the batch then reaches the trainer without a copy). See
    the module docstring for how it relates to ``normalize(apply_crop(images / 255, theta, size))``."""
    rotated = bool(theta[:, 0, 1].any() or theta[:, 1, 0].any())  # not a crop_theta box: not separable
    if images.device.type != "cpu" or size < SEPARABLE_MIN_PX or rotated:
        cropped = apply_crop(images.float().div_(255.0), theta, size)
        mean, std = _mean_std(cropped.device, cropped.dtype)
        return torch.sub(cropped, mean, out=out).div_(std)  # normalize()'s values, into ``out`` when given
    b, c, h, w = images.shape
    theta = theta.to(torch.float32)
    ix, wx = cubic_taps(theta[:, 0, 0], theta[:, 0, 2], size, w)
    iy, wy = cubic_taps(theta[:, 1, 1], theta[:, 1, 2], size, h)
    mean, std = _mean_std("cpu", torch.float32)
    out = torch.empty((b, c, size, size), dtype=torch.float32) if out is None else out
    flipped = torch.empty((c, w, h), dtype=torch.float32)  # one image, x as the row axis
    along_x = torch.empty((c, size, h), dtype=torch.float32)
    along_y = torch.empty((c, h, size), dtype=torch.float32)  # the same, y as the row axis
    for n in range(b):
        flipped.copy_(images[n].transpose(1, 2)).div_(255.0)  # the same floats as images.float() / 255
        _taps_pass(flipped, ix[n], wx[n], along_x)  # horizontal first, as grid_sample sums its taps
        _taps_pass(along_y.copy_(along_x.transpose(1, 2)), iy[n], wy[n], out[n])
        out[n].clamp_(0.0, 1.0).sub_(mean).div_(std)
    return out
