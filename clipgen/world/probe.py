"""Transfer probe of a synthetic world: how much of what is learned from *real* carries to each other domain?

The world's styles are calibrated against DomainNet's published transfer from real (docs/world.md): a model trained
on real images only, tested on every domain's test split, relative to its accuracy on real's own test split. This
module measures that on a world config with a cheap learnability probe: the visual tower of the tiny ResNet CLIP
(open_clip's ModifiedResNet, as the quick start trains it) with a linear head, trained with cross-entropy on the
world's real train images. The images are the world's own (the generator's render and rng keys, so the first n
per class are the same pixels as the files of the generated world), drawn in memory: no world is written.
Everything is seeded; on CPU the result is deterministic.

``--matrix`` measures the full source x target matrix instead (DomainNet's single-source tables, e.g. CDTrans's
source-only DeiT-S, docs/world.md): one probe per source domain, trained on its train split for as many images
seen per class as every other source, tested on every domain, and compared with DomainNet's matrix. It says which
domains resemble which; it is measured, never used to tune the styles.

    python -m clipgen.world.probe world=default [--epochs 10 --seeds 0 1 2 --test-per-class 20]
    python -m clipgen.world.probe world=default --matrix [--seeds 0 1 2 --out matrix.json]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from omegaconf import DictConfig

from clipgen.facts import DOMAINS, NATURAL_DOMAIN, domainnet_classes

# DomainNet's single-source transfer, source-only DeiT-S ("Base-S"): top-1 % on the target's test split, trained on
# the source's train split (Xu et al., CDTrans, ICLR 2022; repository CDTrans/CDTrans, README Table 4). Rows are
# sources, columns targets, both in DOMAINS order; the diagonal is not reported. Only compared with, never tuned to.
DOMAINNET_TRANSFER_DEIT_S = {
    "clipart": (None, 21.2, 44.2, 15.3, 59.9, 46.0),
    "infograph": (36.8, None, 39.4, 5.4, 52.1, 32.6),
    "painting": (47.1, 21.7, None, 5.7, 60.2, 39.9),
    "quickdraw": (25.0, 3.3, 10.4, None, 18.8, 14.0),
    "real": (54.8, 23.9, 52.6, 7.4, None, 40.1),
    "sketch": (55.6, 18.6, 42.7, 14.9, 55.7, None),
}
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


def transfer_matrix(cfg: DictConfig, sources=DOMAINS, seeds=(0,), seen_per_class: int = 2250,
                    train_per_class: int | None = None, test_per_class: int = 20) -> list[dict]:
    """Per seed: one probe per source domain, trained on the source's train split (its first ``train_per_class``
    images per class if given, the same cap for every source), tested on every domain's test split. Every probe
    sees ``seen_per_class`` images per class (epochs = that / the source's images per class, rounded), so a small
    domain is not a worse source for being trained less: 2,250 is 25 epochs of real's 90 on the default world.
    ``accuracy[source][target]``; ``relative[source][target]``: above chance as a share of the source's own
    accuracy; ``epochs[source]``; ``cpu_seconds``: this process's CPU time for the seed."""
    from clipgen.world.generate import split_sizes

    sizes = split_sizes(cfg)
    trains = {d: render_split(cfg, d, "train", min(sizes[d]["train"], train_per_class or 10 ** 9)) for d in sources}
    tests = {d: render_split(cfg, d, "test", test_per_class) for d in DOMAINS}
    k = int(tests[NATURAL_DOMAIN][1].max()) + 1
    per_class = {d: len(trains[d][1]) // k for d in sources}
    epochs = {d: max(1, round(seen_per_class / per_class[d])) for d in sources}
    results = []
    for seed in seeds:
        cpu0 = time.process_time()
        acc, rel = {}, {}
        for source in sources:
            net = train_probe(*trains[source], k, epochs=epochs[source], seed=seed)
            summary = summarise({d: probe_accuracy(net, *tests[d]) for d in DOMAINS}, k)
            span = summary["accuracy"][source] - summary["chance"]
            acc[source] = summary["accuracy"]
            rel[source] = {d: (a - summary["chance"]) / span if span > 0 else 0.0 for d, a in acc[source].items()}
        results.append({"seed": seed, "epochs": epochs, "train_per_class": per_class, "classes": k,
                        "chance": 1 / k, "test_images": len(tests[NATURAL_DOMAIN][0]), "accuracy": acc,
                        "relative": rel, "cpu_seconds": round(time.process_time() - cpu0, 1)})
    return results


def format_matrix(results: list[dict]) -> str:
    """The seed-mean matrix: rows are sources, columns targets; accuracy, then the share of the source's own."""
    r0 = results[0]
    sources = list(r0["accuracy"])
    mean = {key: {s: {t: float(np.mean([r[key][s][t] for r in results])) for t in DOMAINS} for s in sources}
            for key in ("accuracy", "relative")}
    trained = ", ".join(f"{s} {r0['train_per_class'][s]} x {r0['epochs'][s]}" for s in sources)
    lines = [(f"transfer matrix: a probe per source (train images per class x epochs: {trained}), "
              f"{r0['classes']} classes (chance {r0['chance']:.3f}), seeds {[r['seed'] for r in results]}; "
              f"{r0['test_images']} test images per domain; {sum(r['cpu_seconds'] for r in results):.0f} CPU s")]
    for key, title in (("accuracy", "accuracy"), ("relative", "above chance, as a share of the source's own")):
        lines += ["", f"{title} (rows: trained on, columns: tested on)",
                  f"{'':<10}" + "".join(f"{t:>10}" for t in DOMAINS)]
        lines += [f"{s:<10}" + "".join(f"{mean[key][s][t]:>10.3f}" for t in DOMAINS) for s in sources]
    cmp = compare_with_domainnet(mean["accuracy"])
    lines += ["", f"vs DomainNet (source-only DeiT-S, CDTrans): Spearman rho {cmp['spearman_rho']:.2f} over "
              f"{cmp['pairs']} source -> target accuracies; per target, sources from best to worst:"]
    lines += [f"{t:<10} world: {' > '.join(o['world']):<52} DomainNet: {' > '.join(o['domainnet'])}"
              for t, o in cmp["best_sources"].items()]
    return "\n".join(lines)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as Spearman's rho needs)."""
    import pandas as pd

    return pd.Series(x).rank(method="average").to_numpy()


def compare_with_domainnet(accuracy: dict[str, dict[str, float]]) -> dict:
    """How the world's matrix (``accuracy[source][target]``, sources a subset of DOMAINS) orders the transfers
    DomainNet reports (DOMAINNET_TRANSFER_DEIT_S): Spearman's rho over every off-diagonal pair, and per target
    the sources from best to worst in the world and in DomainNet."""
    pairs = [(s, t) for s in accuracy for t in DOMAINS if s != t]
    world = np.array([accuracy[s][t] for s, t in pairs])
    ref = np.array([DOMAINNET_TRANSFER_DEIT_S[s][DOMAINS.index(t)] for s, t in pairs])
    rw, rr = _ranks(world), _ranks(ref)
    # undefined (NaN) when either side has no order at all, e.g. a probe at chance everywhere
    rho = float(np.corrcoef(rw, rr)[0, 1]) if len(pairs) > 2 and rw.std() > 0 and rr.std() > 0 else float("nan")
    order = {t: {"world": sorted((s for s in accuracy if s != t), key=lambda s: -accuracy[s][t]),
                 "domainnet": sorted((s for s in accuracy if s != t),
                                     key=lambda s: -DOMAINNET_TRANSFER_DEIT_S[s][DOMAINS.index(t)])}
             for t in DOMAINS}
    return {"spearman_rho": rho, "pairs": len(pairs), "best_sources": order}


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
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the probe from real")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--matrix", action="store_true", help="the full source x target matrix")
    parser.add_argument("--seen-per-class", type=int, default=2250,
                        help="--matrix: images seen per class by every source's probe (epochs follow from it)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="--matrix: train on at most this many images per class of every source")
    parser.add_argument("--out", default=None, help="also write the per-seed results to this JSON file")
    args = parser.parse_args(argv)
    cfg = compose_config(["model=tiny_rn", *args.overrides])
    if args.matrix:
        results = transfer_matrix(cfg, seeds=args.seeds, seen_per_class=args.seen_per_class,
                                  train_per_class=args.train_per_class, test_per_class=args.test_per_class)
        print(format_matrix(results))
    else:
        results = transfer_probe(cfg, args.seeds, args.epochs, test_per_class=args.test_per_class)
        print(format_probe(results))
    if args.out:
        from clipgen.files import atomic_write_json

        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
