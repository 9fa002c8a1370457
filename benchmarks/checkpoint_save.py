"""What the durable checkpoint write costs: a ``latest.pt``-like payload (weights, AdamW state, RNG)
saved the old way and the new way.

    python benchmarks/checkpoint_save.py [--dir DIR] [--repeats 5] [--model clipgen-tiny-rn]

old: mkstemp + ``torch.save(path)`` + ``os.replace`` (no fsync: a power loss could leave a renamed but empty file).
new: ``clipgen.files.atomic_torch_save``: ``torch.save`` into the open temporary file, chmod to the umask, fsync of
the file, rename, fsync of the directory; a failed write names the path and the free space.
Prints the best of --repeats seconds for each side and their ratio (new / old). --dir should be on the disk the
runs live on (the default is a temporary directory under /tmp).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from clipgen.models.checkpoint import model_state  # noqa: E402
from clipgen.models.factory import create_clip  # noqa: E402
from clipgen.train import checkpoint as ckpt  # noqa: E402
from clipgen.train.optim import make_optimizer  # noqa: E402
from clipgen.files import atomic_torch_save


def old_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def payload(model_name: str) -> dict:
    from clipgen.config import compose_config

    torch.manual_seed(0)
    model, tokenizer = create_clip(model_name, 32)
    opt = make_optimizer(model, compose_config(["debug=smoke"]).optim)
    model(torch.randn(2, 3, 32, 32), tokenizer(["a photo of an axe"] * 2))["image_features"].sum().backward()
    opt.step()  # optimizer state as in a real latest.pt
    return {"state_dict": model_state(model), "optimizer": opt.state_dict(), "rng": ckpt.rng_state()}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="clipgen-tiny-rn")
    args = ap.parse_args()
    obj = payload(args.model)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        old = best(lambda: old_save(obj, work / "old.pt"), args.repeats)
        new = best(lambda: atomic_torch_save(obj, work / "new.pt"), args.repeats)
        mb = (work / "new.pt").stat().st_size / 1e6
        assert torch.equal(torch.load(work / "old.pt", weights_only=True)["state_dict"]["logit_scale"],
                           torch.load(work / "new.pt", weights_only=True)["state_dict"]["logit_scale"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"payload {mb:.1f} MB ({args.model}), best of {args.repeats}, in {args.dir or tempfile.gettempdir()}")
    print(f"old (torch.save(path) + rename, no fsync): {old:.3f} s")
    print(f"new (atomic_torch_save, fsync file + dir): {new:.3f} s")
    print(f"ratio new/old: {new / old:.2f}")


if __name__ == "__main__":
    main()
