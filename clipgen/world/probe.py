"""Transfer probe of a synthetic world: how much of what is learned from *real* carries to each other domain?

The world's styles are calibrated against DomainNet's published transfer from real (docs/world.md): a model trained
on real images only, tested on every domain's test split, relative to its accuracy on real's own test split. This
module measures that on a world config with a cheap learnability probe: the visual tower of the tiny ResNet CLIP
(open_clip's ModifiedResNet, as the quick start trains it) with a linear head, trained with cross-entropy on the
world's real train images. The images are the world's own (the generator's render and rng keys, so the first n
per class are the same pixels as the files of the generated world), drawn in memory: no world is written.
Everything is seeded; on CPU the result is deterministic.

    python -m clipgen.world.probe world=default [--epochs 10 --seeds 0 1 2 --test-per-class 20]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from omegaconf import DictConfig

from clipgen.facts import DOMAINS, NATURAL_DOMAIN, domainnet_classes

# The probe's network: the tiny ResNet CLIP's visual tower (clipgen/resources/models/clipgen-tiny-rn.json).
PROBE_LAYERS, PROBE_WIDTH, PROBE_EMBED, PROBE_HEADS = (1, 1, 1, 1), 16, 64, 4


def render_split(cfg: DictConfig, domain: str, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of every world class in ``domain``/``split`` (capped at the world's own
    count), as (N, px, px, 3) uint8 and labels 0..K-1 in world-class order."""
    from clipgen.world.generate import SPLITS, check_world_config, select_classes, split_sizes
    from clipgen.world.generate import render_image
    from clipgen.world.shapes import make_class_shapes

    check_world_config(cfg)
    world = select_classes(cfg)[0]
    shapes = make_class_shapes(world, cfg.world.seed)
    labels = {c: i for i, c in enumerate(domainnet_classes())}
    n = min(per_class, split_sizes(cfg)[domain][split])
    split_id, d_id = SPLITS.index(split), DOMAINS.index(domain)
    images, ys = [], []
    for k, name in enumerate(world):
        for j in range(n):
            img = render_image(domain, shapes[name], (cfg.world.seed, d_id, labels[name], split_id, j),
                               cfg.world.render_px, cfg.world.image_px)
            images.append(np.asarray(img.convert("RGB")))
            ys.append(k)
    return np.stack(images), np.array(ys, np.int64)


def _to_tensor(images: np.ndarray):
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - 0.5) / 0.25


def _network(px: int, num_classes: int):
    import torch
    from open_clip.modified_resnet import ModifiedResNet

    return torch.nn.Sequential(ModifiedResNet(layers=list(PROBE_LAYERS), output_dim=PROBE_EMBED, heads=PROBE_HEADS,
                                              image_size=px, width=PROBE_WIDTH),
                               torch.nn.Linear(PROBE_EMBED, num_classes))


def train_probe(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 10, seed: int = 0,
                batch_size: int = 64, lr: float = 2e-3, threads: int = 1):
    """The probe network trained on (N, px, px, 3) uint8 images with labels 0..num_classes-1. One torch thread by
    default: on 2 cores a one-thread step of this small network is several times faster under load."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = _network(images.shape[1], num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * int(np.ceil(len(images) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    xt, yt = _to_tensor(images), torch.from_numpy(np.asarray(labels, np.int64))
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xb = xt[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # the only augmentation: mirror images
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def probe_accuracy(net, images: np.ndarray, labels: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat([net(_to_tensor(images[i:i + 512])).argmax(1) for i in range(0, len(images), 512)])
    return float((pred.numpy() == np.asarray(labels)).mean())


def summarise(accuracy: dict[str, float], num_classes: int) -> dict:
    """Add ``relative``: accuracy above chance as a share of real's own, (acc - 1/K) / (acc_real - 1/K)."""
    chance = 1 / num_classes
    span = accuracy[NATURAL_DOMAIN] - chance
    return {"accuracy": accuracy, "chance": chance, "classes": num_classes,
            "relative": {d: (a - chance) / span if span > 0 else 0.0 for d, a in accuracy.items()}}


def transfer_probe(cfg: DictConfig, seeds=(0,), epochs: int = 10, train_per_class: int | None = None,
                   test_per_class: int = 20) -> list[dict]:
    """Per seed: train the probe on the world's real train images (all of them unless ``train_per_class``), test
    on the first ``test_per_class`` test images per class of every domain. Images are drawn once for all seeds."""
    started = time.time()
    x_train, y_train = render_split(cfg, NATURAL_DOMAIN, "train", train_per_class or 10 ** 9)
    tests = {d: render_split(cfg, d, "test", test_per_class) for d in DOMAINS}
    k = int(y_train.max()) + 1
    results = []
    for seed in seeds:
        net = train_probe(x_train, y_train, k, epochs=epochs, seed=seed)
        result = summarise({d: probe_accuracy(net, *tests[d]) for d in DOMAINS}, k)
        result.update(seed=seed, epochs=epochs, train_images=len(x_train),
                      test_images=len(tests[NATURAL_DOMAIN][0]), seconds=round(time.time() - started, 1))
        results.append(result)
    return results


def format_probe(results: list[dict]) -> str:
    r0 = results[0]
    rel = {d: float(np.mean([r["relative"][d] for r in results])) for d in DOMAINS}
    acc = {d: float(np.mean([r["accuracy"][d] for r in results])) for d in DOMAINS}
    lines = [f"transfer from real: probe trained on {r0['train_images']} real images, {r0['classes']} classes "
             f"(chance {r0['chance']:.3f}), {r0['epochs']} epochs, seeds {[r['seed'] for r in results]}; "
             f"{r0['test_images']} test images per domain",
             f"{'domain':<10} {'accuracy':>8} {'relative':>8}   (relative: above chance, as a share of real's)"]
    lines += [f"{d:<10} {acc[d]:>8.3f} {rel[d]:>8.2f}" for d in sorted(DOMAINS, key=lambda d: -rel[d])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from clipgen.config import compose_config

    parser = argparse.ArgumentParser(prog="python -m clipgen.world.probe", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. world=default")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--test-per-class", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = compose_config(["model=tiny_rn", *args.overrides])
    print(format_probe(transfer_probe(cfg, args.seeds, args.epochs, test_per_class=args.test_per_class)))


if __name__ == "__main__":
    main()
