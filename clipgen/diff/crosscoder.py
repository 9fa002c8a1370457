"""A small crosscoder over two runs' image embeddings: the dictionary behind the SAE generator (generators/sae.py).

Two separately trained CLIP runs embed an image in two unaligned spaces, so one dictionary over rows of either
space would mix them. A crosscoder reads both at once: per image the input is ``x = [z_a, z_b]`` (each run's
L2-normalised embedding, centred and rotated onto its top ``pca_dim`` principal directions of the fitting images,
scaled to unit mean variance per dimension, so both runs weigh the same), one shared sparse code and a decoder
per run:

    f = ReLU((x - b_dec) W_enc + b_enc),    x_hat = f [D_a | D_b] + b_dec  (b_dec: the tied pre-encoder bias)
    loss = mean over the batch and the 2 x pca_dim dimensions of (x - x_hat)^2
           + l1 * mean over the batch of sum_j f_j (|D_a[j]| + |D_b[j]|)

The reconstruction error is averaged over dimensions (not summed), so with unit-variance inputs it reads as the
fraction of variance left unexplained; the L1 term is weighted by each latent's decoder norms, as in crosscoder
model diffing, so a latent cannot dodge it by shrinking its code and growing its decoder. Adam; batches drawn
without replacement from a seeded permutation per pass; everything seeded, so a refit is the same dictionary.
The share of a latent's decoder norm that belongs to run B says whether it is a feature of both runs' geometry
or mostly of one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clipgen.procs import torch_threads


@dataclass
class Standardiser:
    """Per run: mean, projection onto the top principal directions and scale, fitted on the fitting images."""
    means: list[np.ndarray]
    bases: list[np.ndarray]  # [dim, k] per run, orthonormal columns
    scales: list[float]

    def transform(self, embs: list[np.ndarray], chunk: int = 16384) -> np.ndarray:
        """``[n, k_a + k_b]`` float32, in chunks of rows (a 100k x 1024 float64 copy would be 800 MB)."""
        n = len(embs[0])
        out = np.empty((n, sum(b.shape[1] for b in self.bases)), dtype=np.float32)
        col = 0
        for e, mu, basis, s in zip(embs, self.means, self.bases, self.scales):
            k = basis.shape[1]
            mu32, basis32 = mu.astype(np.float32), (basis / s).astype(np.float32)
            for r in range(0, n, chunk):
                x = np.asarray(e[r:r + chunk], dtype=np.float32)
                x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                out[r:r + chunk, col:col + k] = (x - mu32) @ basis32
            col += k
        return out

    def to_embedding(self, run: int, directions: np.ndarray) -> np.ndarray:
        """Directions ``[n, k]`` in run ``run``'s block back in its embedding space ``[n, dim]`` (for naming)."""
        return directions @ self.bases[run].T


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def fit_standardiser(embs: list[np.ndarray], pca_dim: int) -> Standardiser:
    means, bases, scales = [], [], []
    for e in embs:
        e = _unit(e)
        mu = e.mean(axis=0)
        c = e - mu
        k = max(1, min(int(pca_dim), c.shape[1], max(len(c) - 1, 1)))
        c32 = c.astype(np.float32)  # the n x d x d product in float32 (half the time); the d x d solve in float64
        evals, evecs = np.linalg.eigh((c32.T @ c32).astype(np.float64))  # ascending
        basis = evecs[:, ::-1][:, :k]
        basis = basis * np.where(basis[np.abs(basis).argmax(axis=0), np.arange(k)] < 0, -1.0, 1.0)  # fixed signs
        z = c @ basis
        scales.append(float(np.sqrt(max((z ** 2).sum(axis=1).mean() / k, 1e-12))))
        means.append(mu)
        bases.append(basis)
    return Standardiser(means, bases, scales)


@contextlib.contextmanager
def one_thread():
    """torch and numpy's BLAS on one thread: the crosscoder's ops are small, and one thread is immune to a busy
    machine's spin-waiting (on the shared 2-core machine two threads were 4-10x slower per training step, and a
    1024 x 1024 eigendecomposition 3x slower); the caller's settings are restored."""
    from threadpoolctl import threadpool_limits

    with torch_threads(1), threadpool_limits(limits=1):
        yield


class Crosscoder(nn.Module):
    def __init__(self, dims: tuple[int, int], latents: int, seed: int = 0):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        g = torch.Generator().manual_seed(int(seed))
        dec = torch.randn(latents, sum(self.dims), generator=g)
        dec = dec / dec.norm(dim=1, keepdim=True) * 0.1  # small decoders, the encoder their transpose
        self.w_dec = nn.Parameter(dec)  # [latents, d_a + d_b]
        self.w_enc = nn.Parameter(dec.T.clone())  # [d_a + d_b, latents]
        self.b_enc = nn.Parameter(torch.zeros(latents))
        self.b_dec = nn.Parameter(torch.zeros(sum(self.dims)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.w_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.w_dec + self.b_dec

    def decoder_norms(self) -> torch.Tensor:
        """``[latents, 2]``: each latent's decoder norm in run A's block and in run B's."""
        da = self.dims[0]
        return torch.stack([self.w_dec[:, :da].norm(dim=1), self.w_dec[:, da:].norm(dim=1)], dim=1)


def crosscoder_loss(model: Crosscoder, x: torch.Tensor, l1: float) -> tuple[torch.Tensor, dict]:
    f = model.encode(x)
    rec = (model.decode(f) - x).pow(2).mean()  # averaged over the batch and the dimensions
    sparsity = (f * model.decoder_norms().sum(dim=1)).sum(dim=1).mean()
    return rec + l1 * sparsity, {"reconstruction": rec.item(), "l1": sparsity.item()}


def train_crosscoder(x: np.ndarray, dims: tuple[int, int], latents: int, *, steps: int, batch_size: int,
                     lr: float, l1: float, seed: int) -> tuple[Crosscoder, dict]:
    """Fit on the rows of ``x`` (``Standardiser.transform`` output). Returns the model (eval mode) and a summary:
    the loss parts at the first and last step, the fraction of variance unexplained on ``x``, the mean number of
    active latents per row (L0) and how many latents never fire."""
    with one_thread():
        return _train(torch.as_tensor(np.asarray(x, np.float32)), dims, latents, steps=steps,
                      batch_size=batch_size, lr=lr, l1=l1, seed=seed)


def _train(data: torch.Tensor, dims: tuple[int, int], latents: int, *, steps: int, batch_size: int, lr: float,
           l1: float, seed: int) -> tuple[Crosscoder, dict]:
    n = data.shape[0]
    model = Crosscoder(dims, latents, seed)
    with torch.no_grad():
        model.b_dec.copy_(data.mean(dim=0))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(int(seed))
    batch = max(1, min(int(batch_size), n))
    perm, pos = torch.randperm(n, generator=g), 0
    first = last = None
    for _ in range(int(steps)):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        loss, parts = crosscoder_loss(model, data[perm[pos:pos + batch]], l1)
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = first or parts
        last = parts
    model.eval()
    f = encode(model, data.numpy())
    with torch.no_grad():
        rec = model.decode(torch.as_tensor(f)) - data
        fvu = float(rec.pow(2).sum() / (data - data.mean(dim=0)).pow(2).sum().clamp_min(1e-12))
    active = f > 0
    return model, {"steps": int(steps), "rows": int(n), "latents": int(latents), "first": first, "last": last,
                   "fvu": round(fvu, 4), "l0": round(float(active.sum(axis=1).mean()), 2),
                   "dead": int((~active.any(axis=0)).sum())}


def encode(model: Crosscoder, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Latent activations ``[n, latents]`` (float32), in chunks."""
    out = []
    with torch.no_grad(), one_thread():
        for s in range(0, len(x), chunk):
            out.append(model.encode(torch.as_tensor(np.asarray(x[s:s + chunk], np.float32))).numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.b_enc.shape[0]), np.float32)
