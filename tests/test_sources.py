"""Optional sources (CC shards as the base corpus, ImageNet-Sketch), the paper family at reduced scale, and bad
input that must fail with one clear error and leave no half-written recipe directory behind."""
from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_cfg, scratch_dir
from clipgen import layout
from clipgen.data.cc import expand_shards, read_cc_shards, read_shard_member
from clipgen.data.imagenet_captions import read_imagenet_captions, wnid_table
from clipgen.data.index import Sample
from clipgen.data.sources import domainnet_index
from clipgen.errors import ClipgenError
from clipgen.facts import DOMAINS, domainnet_classes, domainnet_to_imagenet, imagenet_class_index
from clipgen.recipes.build import build_recipe
from clipgen.recipes.plan import check_no_leak, paper_family, plan_recipe, train_index
from clipgen.recipes.shards import count_shard_samples, write_shards

PAPER_C2 = ["aircraft carrier", "axe", "banana", "barn", "bed", "candle", "lion", "mountain", "necklace",
            "penguin", "pizza", "saxophone", "television", "tractor", "traffic light"]


def assert_no_partial(root: Path) -> None:
    """Every directory under recipes/ is a finished build (has manifest.json); no temporary leftovers."""
    rec = Path(root) / "recipes"
    if rec.exists():
        for p in rec.iterdir():
            assert p.is_dir() and (p / "manifest.json").is_file(), f"half-written {p}"


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def read_recipe_dir(d: Path) -> list[dict[str, bytes]]:
    sizes = json.loads((d / "sizes.json").read_text())
    return [rec for name in sorted(sizes) for rec in read_tar(d / name).values()]


# --- CC3M / CC12M base corpus ------------------------------------------------------------------------------------

def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def cc_shards(tiny_root, tmp_path_factory):
    with scratch_dir(tmp_path_factory, "cc") as out:
        yield _cc_shards(tiny_root, out)


def _cc_shards(tiny_root, out):
    """img2dataset-style shards (jpg + txt + json) made from the tiny world's base images; every third image is
    enlarged to 40x48 so that the shard writer has to resize it. Returns (dir, {sample_id: (caption, jpg)})."""
    nat = layout.world_dir(make_cfg(tiny_root, "debug=smoke")) / "natural"
    base = read_imagenet_captions(nat / "imagenet_captions.json", nat / "train")
    expected = {}
    per_shard = (len(base) + 1) // 2
    for si in range(2):
        with tarfile.open(out / f"{si:05d}.tar", "w") as tf:
            for j, s in enumerate(base[si * per_shard:(si + 1) * per_shard]):
                key = f"{si:05d}{j:04d}"
                im = Image.open(s.path).convert("RGB")
                if j % 3 == 2:
                    im = im.resize((40, 48))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                caption = f"  {s.caption}\n"  # img2dataset keeps the raw text; the reader normalises it
                _add(tf, f"{key}.jpg", buf.getvalue())
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "caption": s.caption, "status": "success"}).encode())
                expected[f"cc/{si:05d}/{key}"] = (s.caption, buf.getvalue(), im.size)
        (out / f"{si:05d}_stats.json").write_text("{}")  # img2dataset's side files are ignored
    return out, expected


def test_cc_reader_index_and_refs(cc_shards, tmp_path):
    d, expected = cc_shards
    samples = read_cc_shards(f"{d}/{{00000..00001}}.tar")
    assert [s.sample_id for s in samples] == list(expected)
    for s in samples:
        caption, jpg, _ = expected[s.sample_id]
        assert (s.domain, s.class_name, s.label, s.split, s.source) == ("natural", "", -1, "train", "cc")
        assert s.caption == caption and s.path.startswith(str(d)) and "#" in s.path
        assert read_shard_member(s.path) == jpg
    assert expand_shards(f"{d}/*.tar") == expand_shards(f"{d}/00000.tar::{d}/00001.tar")
    with pytest.raises(ClipgenError, match=r"data.cc_shards=.*00002.tar' does not exist"):
        expand_shards(f"{d}/{{00000..00002}}.tar")
    with pytest.raises(ClipgenError, match="matches no file"):
        expand_shards(f"{d}/nope*.tar")
    with pytest.raises(ClipgenError, match="no member 'zzz.jpg'"):
        read_shard_member(f"{d}/00000.tar#zzz.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes((d / "00000.tar").read_bytes()[:5000])
    with pytest.raises(ClipgenError, match=r"cut.tar' is truncated inside member"):
        read_cc_shards(str(cut))


def test_shard_writer_matches_tarfile(tmp_path):
    """The hand-built USTAR headers give the bytes tarfile would write (so shards stay byte-identical)."""
    samples = [Sample(f"x/{i}", str(tmp_path / f"{i}.png"), "real", "axe", 11, "train", "domainnet") for i in range(3)]
    for s in samples:
        Image.new("RGB", (32, 32), (1, 2, 3)).save(s.path)
    sizes = write_shards(tmp_path, samples, ["a", "b", "c"], 32, "png", 2, 2)
    for name, n in sizes.items():
        assert count_shard_samples(tmp_path / name) == n
        ref = tmp_path / f"ref-{name}"
        with tarfile.open(ref, "w", format=tarfile.USTAR_FORMAT) as tf, tarfile.open(tmp_path / name) as ours:
            for m in ours:
                data = ours.extractfile(m).read()
                info = tarfile.TarInfo(m.name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
        assert ref.read_bytes() == (tmp_path / name).read_bytes()


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_cc_base_recipe_round_trip(tiny_root, cc_shards, fmt):
    d, expected = cc_shards
    cfg = make_cfg(tiny_root, "debug=smoke", "recipe=cg_low", "data.base=cc", f"recipe.image_format={fmt}",
                   f"data.cc_shards='{d}/{{00000..00001}}.tar'")
    out = build_recipe(cfg)
    manifest = json.loads((Path(out["recipe_dir"]) / "manifest.json").read_text())
    base_dir = (Path(out["recipe_dir"]) / manifest["base"]["dir"]).resolve()
    assert manifest["base"]["num_samples"] == len(expected) and manifest["source"]["base"] == "cc"
    records = read_recipe_dir(base_dir)
    assert len(records) == len(expected)
    for rec in records:
        meta = json.loads(rec["json"])
        caption, jpg, size = expected[meta["sample_id"]]
        assert (meta["source"], meta["domain"], meta["label"]) == ("cc", "natural", -1)
        assert rec["txt"].decode() == caption
        img = Image.open(io.BytesIO(rec[fmt]))
        assert img.size == (32, 32)
        if size == (32, 32):  # no resize needed: the JPEG is copied byte for byte, a PNG keeps its pixels
            if fmt == "jpg":
                assert rec["jpg"] == jpg
            else:
                assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))
    assert_no_partial(tiny_root)


def test_cc_corrupt_image_leaves_nothing(tiny_root, cc_shards, tmp_path):
    d, _ = cc_shards
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(d / "00000.tar", bad / "00000.tar")
    with tarfile.open(bad / "00001.tar", "w") as tf:
        _add(tf, "x0.jpg", b"\xff\xd8 not a jpeg")
        _add(tf, "x0.txt", b"a broken image")
    root = tmp_path / "root"
    shutil.copytree(tiny_root / "world", root / "world")
    cfg = make_cfg(root, "debug=smoke", "recipe=cg_low", "data.base=cc", f"data.cc_shards='{bad}/*.tar'")
    with pytest.raises(ClipgenError, match=r"image '.*00001.tar#x0.jpg' cannot be read"):
        build_recipe(cfg)
    assert_no_partial(root)
    assert not any(p.name.startswith("base-") for p in (root / "recipes").iterdir())


def test_the_base_corpus_is_part_of_the_recipe_and_the_run_identity(tiny_root, cc_shards, tmp_path):
    """Pointing data.cc_shards at other shards under the same paths.root used to reuse the recipe built on the
    old base corpus; a corpus that does not exist was not noticed once a recipe existed."""
    from clipgen.rundir import run_name

    d, expected = cc_shards
    root = tmp_path / "root"
    shutil.copytree(tiny_root / "world", root / "world")
    over = ("debug=smoke", "recipe=cg_low", "data.base=cc")
    both = make_cfg(root, *over, f"data.cc_shards='{d}/{{00000..00001}}.tar'")
    first = make_cfg(root, *over, f"data.cc_shards='{d}/00000.tar'")
    a, b = build_recipe(both), build_recipe(first)
    assert a["recipe_id"] == b["recipe_id"] and a["recipe_dir"] != b["recipe_dir"]
    bases = [json.loads((Path(r["recipe_dir"]) / "manifest.json").read_text())["base"] for r in (a, b)]
    assert bases[0]["dir"] != bases[1]["dir"] and bases[0]["num_samples"] == len(expected) > bases[1]["num_samples"]
    assert build_recipe(both)["built"] is False  # the same corpus again: nothing to build
    names = {run_name(cfg, a["recipe_id"]) for cfg in (both, first)}
    assert len(names) == 2 and all("-x" in n for n in names)  # the run's name carries the corpus too
    for missing in (f"data.cc_shards='{tmp_path}/nowhere/{{00000..00001}}.tar'", f"data.cc_shards='{d}/*.nope.tar'"):
        with pytest.raises(ClipgenError, match="does not exist|matches no file"):
            build_recipe(make_cfg(root, *over, missing))  # even though recipes on another corpus exist


# --- ImageNet-Sketch -----------------------------------------------------------------------------------------------

def _wnid_of(name: str) -> str:
    return imagenet_class_index()[domainnet_to_imagenet()[name][0]][0]


def test_imagenet_sketch_joins_sketch_candidates_only(tiny_root, tmp_path):
    cfg0 = make_cfg(tiny_root, "debug=smoke", "data.base=none")
    index = domainnet_index(cfg0)
    world = sorted({s.class_name for s in index})
    mapped = [c for c in world if domainnet_to_imagenet()[c]]
    heldout = [c for c in cfg0.heldout.classes if c in world and domainnet_to_imagenet()[c]]
    assert heldout and len(mapped) >= 2
    unmapped_wnid = next(w for w, (_, lab) in wnid_table().items() if lab == -1 and w.startswith("n"))
    outside = next(c for c in domainnet_classes() if c not in world and domainnet_to_imagenet()[c])
    ins = tmp_path / "imagenet-sketch"
    plan_files = {_wnid_of(heldout[0]): 3, _wnid_of(next(c for c in mapped if c not in heldout)): 4,
                  unmapped_wnid: 2, _wnid_of(outside): 2}
    for wnid, n in plan_files.items():
        (ins / wnid).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(ins / wnid / f"{wnid}_{i}.JPEG")
    cfg = make_cfg(tiny_root, "debug=smoke", "data.base=none", "data.use_imagenet_sketch=true",
                   f"data.imagenet_sketch_root={ins}")
    extra = [s for s in domainnet_index(cfg) if s.source == "imagenet_sketch"]
    assert len(extra) == 7  # unmapped wnid and the class outside the world are dropped
    assert {(s.domain, s.split) for s in extra} == {("sketch", "train")}
    assert {s.class_name for s in extra} <= set(world) and all(s.label == domainnet_classes().index(s.class_name)
                                                                for s in extra)
    full, c2 = domainnet_index(cfg), list(cfg.heldout.classes)
    family = {s.kind: s for s in paper_family(["sketch"])}
    # Appended after DomainNet's sketches of the same class, they are used where a list's quota exceeds its
    # DomainNet part (CG-low: f = S/|X| close to 1), never counted in S.
    for kind, keep in (("cg_low_pseudo", True), ("cg_low", False)):
        with_ins, without = plan_recipe(family[kind], full, c2), plan_recipe(family[kind], index, c2)
        check_no_leak(with_ins)
        assert with_ins.size == without.size == with_ins.target_size  # S never counts the extra sketches
        got = [s.class_name for s in with_ins.samples if s.source == "imagenet_sketch"]
        assert (heldout[0] in got) == keep and got
    out = build_recipe(make_cfg(tiny_root, "debug=smoke", "recipe=cg_low", "data.base=none",
                                "data.use_imagenet_sketch=true", f"data.imagenet_sketch_root={ins}"))
    metas = [json.loads(r["json"]) for r in read_recipe_dir(Path(out["recipe_dir"]))]
    assert len(metas) == with_ins.size
    assert sorted(m["sample_id"] for m in metas if m["source"] == "imagenet_sketch") == \
        sorted(s.sample_id for s in with_ins.samples if s.source == "imagenet_sketch")
    with pytest.raises(ClipgenError, match="needs data.imagenet_sketch_root"):
        domainnet_index(make_cfg(tiny_root, "debug=smoke", "data.use_imagenet_sketch=true"))
    (ins / "not_a_wnid").mkdir()
    with pytest.raises(ClipgenError, match="unknown folder 'not_a_wnid'"):
        domainnet_index(cfg)


# --- the paper family at reduced scale ---------------------------------------------------------------------------

def synthetic_index(scale: int = 40, n_classes: int = 40, seed: int = 0) -> list[Sample]:
    """A DomainNet-like index without pixels: protocol §2.2's totals divided by ``scale``, uneven per class."""
    totals = {"clipart": 33_525, "infograph": 36_023, "painting": 50_416, "quickdraw": 120_750, "real": 120_906,
              "sketch": 48_212}
    rng = random.Random(seed)
    names = domainnet_classes()
    classes = sorted(set(PAPER_C2) | set(rng.sample(names, n_classes - len(PAPER_C2))), key=names.index)
    out = []
    for d in DOMAINS:
        weights = [rng.lognormvariate(0, 0.6) for _ in classes]
        for c, w in zip(classes, weights):
            n = max(1, round(totals[d] / scale * w / sum(weights)))
            for split, k in (("train", n), ("test", max(1, n // 3))):
                out += [Sample(f"{d}/{c}/{split}{i}", f"/x/{d}/{c}/{split}{i}.jpg", d, c, names.index(c), split,
                               "domainnet") for i in range(k)]
    return out


def test_paper_family_sizes_and_unique_ids():
    t0 = time.time()
    index = synthetic_index()
    tindex = train_index(index)
    specs = paper_family()
    assert len(specs) == 1 + 5 * 5 + 5 * 12 + 18 + 5
    ids = [s.recipe_id for s in specs]
    assert len(set(ids)) == len(ids)
    n_real = sum(1 for s in index if s.domain == "real" and s.split == "train")
    for spec in specs:
        plan = plan_recipe(spec, tindex, PAPER_C2)
        check_no_leak(plan)
        sample_ids = [s.sample_id for s in plan.samples]
        assert len(set(sample_ids)) == len(sample_ids), spec.recipe_id
        if spec.kind == "natural_only":
            assert plan.size == n_real
        else:
            D = spec.test_domain
            S = sum(1 for s in index if s.split == "train" and (s.domain == "real" or (s.domain == D and
                                                                                        s.class_name not in PAPER_C2)))
            assert plan.target_size == S and plan.size == S, spec.recipe_id
        assert set(plan.counts()) <= set(spec.domains)
    # planning from the grouped index is the same as planning from the sample list
    for spec in specs[1:4]:
        assert [s.sample_id for s in plan_recipe(spec, index, PAPER_C2).samples] == \
            [s.sample_id for s in plan_recipe(spec, tindex, PAPER_C2).samples]
    assert time.time() - t0 < 10


# --- bad input: one clear error each, nothing half-written --------------------------------------------------------

@pytest.fixture()
def dn_copy(tiny_root, tmp_path):
    dst = tmp_path / "dn"
    shutil.copytree(layout.world_dir(make_cfg(tiny_root, "debug=smoke")) / "domainnet", dst)
    return dst


def dn_cfg(root, dn, *extra):
    return make_cfg(root, "debug=smoke", "data=domainnet", f"data.domainnet_root={dn}", "data.base=none", *extra)


def _drop_class(dn: Path, domain: str) -> str:
    """Remove every line of one class from both split files of ``domain``; returns the class folder."""
    folder = (dn / f"{domain}_train.txt").read_text().split()[0].split("/")[1]
    for split in ("train", "test"):
        f = dn / f"{domain}_{split}.txt"
        f.write_text("".join(ln + "\n" for ln in f.read_text().splitlines() if f"/{folder}/" not in ln))
    return folder


def test_class_missing_from_a_domain(dn_copy, tmp_path):
    folder = _drop_class(dn_copy, "clipart")
    root = tmp_path / "out"
    with pytest.raises(ClipgenError, match=rf"class '{folder.replace('_', ' ')}' is missing from domain 'clipart'"
                                           r".*data.allow_missing_classes=true"):
        build_recipe(dn_cfg(root, dn_copy))
    assert_no_partial(root)
    out = build_recipe(dn_cfg(root, dn_copy, "data.allow_missing_classes=true", "recipe=cg_low",
                              "recipe.test_domain=clipart"))
    counts = json.loads((Path(out["recipe_dir"]) / "manifest.json").read_text())["counts"]
    assert folder.replace("_", " ") not in counts["clipart"] and folder.replace("_", " ") in counts["real"]


def test_split_file_disagrees_with_folder_leaves_nothing(dn_copy, tmp_path):
    rel = (dn_copy / "real_train.txt").read_text().split()[0]
    (dn_copy / rel).unlink()
    root = tmp_path / "out"
    with pytest.raises(ClipgenError, match=rf"real_train.txt:1 lists '{rel}', which does not exist"):
        build_recipe(dn_cfg(root, dn_copy))
    assert_no_partial(root)


def test_index_cache_is_reused_and_follows_its_inputs(dn_copy, tmp_path, monkeypatch, caplog):
    from clipgen.data import sources

    root = tmp_path / "out"
    cfg = dn_cfg(root, dn_copy)
    first = domainnet_index(cfg)
    cached = list((root / "cache").glob("index-domainnet-*.json.gz"))
    assert len(cached) == 1

    real_reader = sources.read_domainnet
    monkeypatch.setattr(sources, "read_domainnet", lambda *a, **k: pytest.fail("the cached index was not used"))
    assert domainnet_index(cfg) == first  # same inputs: served from the cache, equal field for field
    # An edited split file is another input: the cache is not used, the folder is read again.
    lines = (dn_copy / "sketch_test.txt").read_text().splitlines()
    (dn_copy / "sketch_test.txt").write_text("".join(ln + "\n" for ln in lines[:-1]))
    monkeypatch.setattr(sources, "read_domainnet", real_reader)
    second = domainnet_index(cfg)
    assert len(second) == len(first) - 1 and len(list((root / "cache").glob("index-domainnet-*"))) == 2
    # A damaged cache file is reported and rebuilt, never trusted.
    for f in (root / "cache").glob("index-domainnet-*"):
        f.write_bytes(b"not gzip")
    with caplog.at_level("WARNING", logger="clipgen.data"):
        assert domainnet_index(cfg) == second
    assert "cannot be read" in caplog.text
    # data.index_cache=false reads the source and writes no cache.
    assert domainnet_index(dn_cfg(tmp_path / "nocache", dn_copy, "data.index_cache=false")) == second
    assert not (tmp_path / "nocache" / "cache").exists()


def test_image_listed_in_train_and_test(dn_copy, tmp_path):
    line = (dn_copy / "sketch_train.txt").read_text().splitlines()[0]
    with open(dn_copy / "sketch_test.txt", "a") as f:
        f.write(line + "\n")
    root = tmp_path / "out"
    with pytest.raises(ClipgenError, match=r"is listed twice \(in sketch_train.txt and sketch_test.txt\)"):
        build_recipe(dn_cfg(root, dn_copy))
    assert_no_partial(root)


def test_corrupt_image_mid_build_leaves_nothing(dn_copy, tmp_path):
    rel = (dn_copy / "real_train.txt").read_text().splitlines()[5].split()[0]
    (dn_copy / rel).write_bytes(b"\x89PNG truncated")
    root = tmp_path / "out"
    with pytest.raises(ClipgenError, match=r"image '.*' cannot be read"):
        build_recipe(dn_cfg(root, dn_copy, "recipe=natural_only"))
    assert_no_partial(root)


@pytest.mark.parametrize("kind", ["natural_only", "cg_high"])
def test_empty_recipe(tiny_root, tmp_path, kind):
    root = tmp_path / "out"
    shutil.copytree(tiny_root / "world", root / "world")
    # every train sample carved out as validation: nothing is left to train on
    with pytest.raises(ClipgenError, match="would be empty: the source index has no train samples"):
        build_recipe(make_cfg(root, "debug=smoke", f"recipe={kind}", "data.val_fraction=0.99"))
    assert_no_partial(root)


def test_empty_recipe_when_S_is_zero():
    index = [Sample(f"sketch/axe/{i}", "/x", "sketch", "axe", 11, "train", "domainnet") for i in range(3)]
    index += [Sample(f"clipart/bed/{i}", "/x", "clipart", "bed", 25, "train", "domainnet") for i in range(3)]
    spec = paper_family(["sketch"])[2]  # cg_high: no real, sketch only has the held-out axe -> S = 0
    with pytest.raises(ClipgenError, match=r"would be empty: S = .* = 0"):
        plan_recipe(spec, index, ["axe"])


def test_unknown_heldout_class_leaves_nothing(tiny_root, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(tiny_root / "world", root / "world")
    with pytest.raises(ClipgenError, match=r"heldout.classes: unknown DomainNet class 'unicorn'"):
        build_recipe(make_cfg(root, "debug=smoke", "heldout.classes=[axe,unicorn]"))
    assert_no_partial(root)
    assert not (root / "recipes").exists() or not any((root / "recipes").iterdir())


def test_manifest_counts_equal_shard_contents(tiny_root):
    """What manifest.json and sizes.json claim is what the tars hold, read back sample by sample."""
    import tarfile

    from clipgen.recipes.build import ensure_recipe

    recipe = ensure_recipe(make_cfg(tiny_root, "debug=smoke", "recipe=cg_high"))
    manifest = json.loads((recipe / "manifest.json").read_text())
    sizes = json.loads((recipe / "sizes.json").read_text())
    counts: dict = {}
    per_shard = {}
    for name in sizes:
        with tarfile.open(recipe / name) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
            names = {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
        per_shard[name] = len(metas)
        assert len(names) == len(metas)  # every key has its json (and png/txt share the key)
        for m in metas:
            counts.setdefault(m["domain"], {}).setdefault(m["class_name"], 0)
            counts[m["domain"]][m["class_name"]] += 1
            assert m["split"] == "train"
    assert per_shard == sizes == manifest["shards"]
    assert counts == manifest["counts"] and sum(sizes.values()) == manifest["num_samples"]


def test_index_memo_serves_every_recipe_of_a_process_and_follows_its_inputs(dn_copy, tmp_path, monkeypatch):
    """A multirun of recipe dry runs (one process) decodes the cached index once: later jobs get the same list,
    its hash and its grouping without work; an edited split file or a replaced cache file is read again."""
    from clipgen.data import cache
    from clipgen.data.index import index_hash

    cfg = dn_cfg(tmp_path / "out", dn_copy)
    first = domainnet_index(cfg)
    assert cache.derived(first, "index_hash", index_hash) == index_hash(first)
    monkeypatch.setattr(cache, "_decode", lambda raw: pytest.fail("the index was decoded again"))
    again = domainnet_index(dn_cfg(tmp_path / "out", dn_copy))  # the next job's freshly composed config
    assert again is first
    assert cache.derived(again, "index_hash", lambda s: pytest.fail("hashed again")) == index_hash(first)
    # A damaged cache file is not trusted from memory either: it is read (and reported) again.
    monkeypatch.undo()
    for f in (tmp_path / "out" / "cache").glob("index-domainnet-*"):
        f.write_bytes(b"not gzip")
    assert domainnet_index(cfg) == first
    # An edited split file changes the key: read from the folder again.
    lines = (dn_copy / "sketch_test.txt").read_text().splitlines()
    (dn_copy / "sketch_test.txt").write_text("".join(ln + "\n" for ln in lines[:-1]))
    assert len(domainnet_index(cfg)) == len(first) - 1
