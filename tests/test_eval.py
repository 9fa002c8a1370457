"""Zero-shot evaluation: metrics against hand-computed confusion matrices, the head on a random tiny model, and
run_eval on fake run directories (resume, duplicates, architecture and class-list mismatches)."""
from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from clipgen import layout, rundir
from clipgen.errors import ClipgenError
from clipgen.eval import metrics as M
from clipgen.facts import DOMAINS, class_folder, domainnet_label

from conftest import make_cfg, scratch_dir

# Six DomainNet classes, two of them in the paper's C2 (axe, banana), in DomainNet label order.
FAKE_CLASSES = sorted(["axe", "banana", "bicycle", "cat", "dog", "house"], key=domainnet_label)
FAKE_HELDOUT = ["axe", "banana"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- fake data and runs (also used by test_report.py) --------------------------------------------------------
def write_fake_domainnet(root, classes=FAKE_CLASSES, train_per=2, test_per=3, seed=0):
    """A DomainNet-layout folder with small non-square PNGs (so the eval transform has to crop)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for dom in DOMAINS:
        for split, n in (("train", train_per), ("test", test_per)):
            lines = []
            for c in classes:
                folder = class_folder(c)
                (root / dom / folder).mkdir(parents=True, exist_ok=True)
                for k in range(n):
                    fname = f"{split}_{k}.png"
                    pix = rng.integers(0, 256, size=(36, 44, 3), dtype=np.uint8)
                    Image.fromarray(pix).save(root / dom / folder / fname)
                    lines.append(f"{dom}/{folder}/{fname} {domainnet_label(c)}")
            (root / f"{dom}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def fake_run_cfg(root, data_root, kind="cg_low", seed=0, *extra):
    return make_cfg(root, "debug=smoke", f"recipe={kind}", f"trainer.seed={seed}", "data.source=domainnet",
                    f"data.domainnet_root={data_root}", "data.base=none", *extra)


def make_fake_run(root, data_root, kind="cg_low", seed=0, epochs=2, model_name="clipgen-tiny-rn",
                  weights_of=None, classes=FAKE_CLASSES, heldout=FAKE_HELDOUT, manifest=None, extra=()):
    """A run directory as clipgen-train writes it (clipgen/FORMATS.md), with random weights per epoch."""
    from clipgen.models.factory import create_clip, model_config
    from clipgen.recipes.naming import RECIPE_KINDS, recipe_spec

    cfg = fake_run_cfg(root, data_root, kind, seed, *extra)
    rid = recipe_spec(cfg.recipe).recipe_id
    name = rundir.run_name(cfg, rid)
    run_dir = layout.runs_root(cfg) / name
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    recipe_dir = layout.recipes_root(cfg) / f"{rid}-fake"
    recipe_dir.mkdir(parents=True, exist_ok=True)
    if manifest is not None:
        (recipe_dir / "manifest.json").write_text(json.dumps(manifest))
    meta = {"run_name": name, "recipe_id": rid, "recipe_kind": kind, "recipe_dir": str(recipe_dir),
            "manifest_sha256": "ab" * 32, "test_domain": cfg.recipe.test_domain, "heldout_classes": list(heldout),
            "classes": list(classes), "seed": seed, "model_name": model_name,
            "model_cfg": model_config(model_name), "image_px": 32, "epochs": epochs - 1, "batch_size": 32,
            "steps_per_epoch": 3, "samples_per_epoch": 96, "total_steps": 3 * (epochs - 1), "status": "finished",
            "step": 3 * (epochs - 1), "samples_seen": 96 * (epochs - 1), "git_sha": "deadbeef", "wandb_id": None,
            "train_seconds": 1.0}
    (run_dir / "meta.json").write_text(json.dumps(meta))
    for epoch in range(epochs):
        torch.manual_seed(1000 * seed + 100 * RECIPE_KINDS.index(kind) + epoch)  # runs differ from each other
        model, _ = create_clip(weights_of or model_name, 32)
        torch.save({"state_dict": model.state_dict(), "model_name": model_name, "model_cfg": meta["model_cfg"],
                    "epoch": epoch, "step": 3 * epoch, "samples_seen": 96 * epoch, "run_name": name,
                    "recipe_id": rid, "seed": seed}, run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt")
    return cfg, run_dir


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    with scratch_dir(tmp_path_factory, "fake_dn") as root:
        yield write_fake_domainnet(root / "domainnet")


# --- metrics -------------------------------------------------------------------------------------------------
def test_weighted_vs_unweighted_accuracy_by_hand():
    # 3 classes; class 0 has 4 images (3 right), class 1 has 1 image (0 right), class 2 has none.
    labels = np.array([0, 0, 0, 0, 1])
    preds = np.array([0, 0, 0, 1, 2])
    assert M.accuracy(preds == labels) == pytest.approx(3 / 5)
    assert M.unweighted_accuracy(preds, labels, [0, 1, 2]) == pytest.approx((3 / 4 + 0) / 2)
    pc = M.per_class_accuracy(preds, labels, [0, 1, 2])
    assert pc[0] == pytest.approx(0.75) and pc[1] == 0.0 and np.isnan(pc[2])
    cm = M.confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 0, 1], [0, 0, 0]]


def test_macro_f1_by_hand_ignores_absent_classes():
    labels = np.array([0, 0, 0, 0, 1])
    preds = np.array([0, 0, 0, 1, 2])
    # class 0: tp 3, fp 0, fn 1 -> 6/7; class 1: tp 0 -> 0; class 2 absent from labels: no F1 of its own.
    assert M.macro_f1(preds, labels, 3) == pytest.approx((6 / 7 + 0) / 2)


def test_top5_by_hand():
    logits = np.array([[9, 8, 7, 6, 5, 4, 3],  # label 4 is 5th -> in top-5
                       [9, 8, 7, 6, 5, 4, 3],  # label 5 is 6th -> out
                       [0, 0, 0, 0, 0, 0, 0]], dtype=float)  # ties do not push the label out
    labels = np.array([4, 5, 6])
    assert M.topk_correct(logits, labels, 5).tolist() == [True, False, True]
    assert M.topk_correct(logits[:, :3], np.array([2, 2, 2]), 5).all()  # k capped at the class count


def test_empty_groups_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(M.accuracy(np.zeros(0, dtype=bool)))
        assert np.isnan(M.unweighted_accuracy(np.array([1]), np.array([1]), [0, 2]))
        assert np.isnan(M.macro_f1(np.zeros(0), np.zeros(0), 3))
        out = M.lso_metrics(np.zeros((0, 4)), np.zeros(0), [], ["a", "b", "c", "d"], ["a"], ["sketch", "real"])
        assert np.isnan(out["sketch-lso-ood"]) and out["real-n-id"] == 0 and np.isnan(out["real-a-ood"])


def test_lso_metrics_by_hand():
    classes = ["aircraft carrier", "axe", "cat", "dog"]  # C2 = aircraft carrier, axe
    labels = np.array([0, 0, 1, 2, 3, 3, 0, 2])
    preds = np.array([0, 1, 1, 2, 2, 3, 0, 0])
    domains = ["sketch"] * 6 + ["real"] * 2
    logits = np.eye(4)[preds] * 10.0
    out = M.lso_metrics(logits, labels, domains, classes, ["aircraft carrier", "axe"], ["sketch", "real"])
    # sketch ood: images 0,1 (class 0: 1/2) and 2 (class 1: 1/1) -> weighted 2/3, unweighted (0.5 + 1)/2
    assert out["sketch-lso-ood"] == pytest.approx(2 / 3)
    assert out["sketch-lso-unweighted-ood"] == pytest.approx(0.75)
    assert out["sketch-aircraft carrier-ood"] == pytest.approx(0.5) and out["sketch-axe-ood"] == 1.0
    # sketch id: images 3 (right), 4 (wrong), 5 (right); per class: cat 1/1, dog 1/2
    assert out["sketch-lso-id"] == pytest.approx(2 / 3)
    assert out["sketch-lso-unweighted-id"] == pytest.approx(0.75)
    assert out["sketch-acc"] == pytest.approx(4 / 6)
    assert (out["sketch-n-ood"], out["sketch-n-id"]) == (3, 3)
    assert out["sketch-top5-ood"] == 1.0  # 4 classes: everything is in the top 5
    # real: image 6 class 0 right, image 7 class 2 predicted 0; real has no axe images -> NaN
    assert out["real-lso-ood"] == 1.0 and out["real-lso-id"] == 0.0 and np.isnan(out["real-axe-ood"])
    # real macro-F1 over present classes {0, 2}: class 0 tp1 fp1 fn0 -> 2/3, class 2 -> 0
    assert out["real-macro-f1"] == pytest.approx(1 / 3)


# --- zero-shot head ------------------------------------------------------------------------------------------
def test_class_embeddings_are_normalised_means():
    from clipgen.models.factory import create_clip
    from clipgen.models.zeroshot import class_embeddings, encode_images

    torch.manual_seed(0)
    model, tok = create_clip("clipgen-tiny-rn", 32)
    templates = ["a photo of a {}.", "a sketch of the {}."]
    emb = class_embeddings(model, tok, ["axe", "cat", "dog"], templates, "cpu", batch_size=4)
    assert emb.shape == (3, 64)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    t = model.encode_text(tok(["a photo of a cat.", "a sketch of the cat."]), normalize=True).detach()
    mean = t.mean(0)
    assert torch.allclose(emb[1], mean / mean.norm(), atol=1e-5)
    img = encode_images(model, np.zeros((5, 3, 32, 32), dtype=np.uint8), "cpu", batch_size=2)
    assert img.shape == (5, 64) and torch.allclose(img.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_load_image_resizes_the_short_side_and_centre_crops(tmp_path):
    from PIL import Image

    from clipgen.eval.images import load_image
    from clipgen.models.zeroshot import normalize_images

    pix = np.zeros((32, 96, 3), dtype=np.uint8)  # h 32, w 96: thirds red | green | blue
    pix[:, :32, 0] = pix[:, 32:64, 1] = pix[:, 64:, 2] = 255
    Image.fromarray(pix).save(tmp_path / "wide.png")
    arr = load_image(str(tmp_path / "wide.png"), 16)
    assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8
    assert arr[1].min() > 200 and arr[0].max() < 50  # only the green middle third survives the crop
    x = normalize_images(torch.from_numpy(arr[None]))
    assert x.dtype == torch.float32 and x[0, 1].mean() > 1.5  # (1 - 0.458) / 0.261


def test_random_tiny_model_scores_near_chance_on_tiny_world(tiny_root):
    """evaluate_checkpoint, the pure function behind clipgen-eval, on the tiny world's real + sketch test images."""
    from clipgen.data.sources import domainnet_index
    from clipgen.eval.images import decode_images
    from clipgen.eval.run import evaluate_checkpoint
    from clipgen.eval.testsets import EvalSet
    from clipgen.facts import zeroshot_templates
    from clipgen.models.factory import create_clip
    from clipgen.models.kinds import kind_for

    cfg = make_cfg(tiny_root, "debug=smoke")
    test = [s for s in domainnet_index(cfg) if s.split == "test" and s.domain in ("real", "sketch")]
    classes = sorted({s.class_name for s in test}, key=domainnet_label)
    domains = np.array([s.domain for s in test])
    evalset = EvalSet(sample_ids=np.array([s.sample_id for s in test]), domains=domains,
                      labels=np.array([classes.index(s.class_name) for s in test]),
                      images=decode_images([s.path for s in test], 32),
                      tasks={"domainnet-sketch": ("sketch", np.ones(len(test), dtype=bool))})
    heldout = [c for c in cfg.heldout.classes if c in classes]
    torch.manual_seed(0)
    model, tok = create_clip("clipgen-tiny-rn", 32)
    metrics, out = evaluate_checkpoint(model, tok, kind_for("clip"), evalset, classes, heldout,
                                       list(zeroshot_templates("paper86")), ["domainnet-sketch"], "cpu", 256)
    chance = 1 / len(classes)
    m = metrics["domainnet-sketch"]
    acc, n = m["sketch-acc"], m["sketch-n-ood"] + m["sketch-n-id"]
    # A random model is a (near-)constant classifier: within 4 binomial standard errors of chance, or one class.
    assert abs(acc - chance) <= 4 * np.sqrt(chance * (1 - chance) / n) + 1 / len(classes)
    assert out["logits"].shape == (len(test), len(classes)) and "real-lso-ood" in m


# --- run_eval ------------------------------------------------------------------------------------------------
def _lines(run_dir):
    return [json.loads(x) for x in (run_dir / "eval" / "results.jsonl").read_text().splitlines()]


def test_run_eval_writes_one_line_per_checkpoint(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    cfg, run_dir = make_fake_run(tmp_path, fake_data)
    out = run_eval(cfg)
    assert out["evaluated"] == 2 and out["skipped"] == 0 and out["run_dir"] == str(run_dir)
    lines = _lines(run_dir)
    assert [r["epoch"] for r in lines] == [0, 1] and {r["task"] for r in lines} == {"domainnet-sketch"}
    for r in lines:
        for key in ("sketch-lso-ood", "sketch-lso-id", "real-lso-ood", "sketch-macro-f1", "sketch-axe-ood"):
            assert np.isfinite(r["metrics"][key])
        assert r["metrics"]["sketch-n-ood"] == 2 * 3 and r["metrics"]["sketch-n-id"] == 4 * 3
        assert r["num_images"] == 2 * 6 * 3 and len(r["checkpoint_sha256"]) == 64
        assert r["recipe_id"] == "lso-rs-nosketchclasses" and r["git_sha"] == "deadbeef"
    npz = np.load(run_dir / "eval" / "outputs" / "epoch_001.npz")
    assert npz["logits"].dtype == np.float16 and npz["image_embeddings"].shape == (36, 64)
    assert set(npz["domains"]) == {"real", "sketch"} and npz["labels"].max() == len(FAKE_CLASSES) - 1
    head = json.loads((run_dir / "eval" / "zeroshot_head.json").read_text())
    assert head["classes"] == FAKE_CLASSES and len(head["templates"]) == 86
    assert out["final"] == pytest.approx(lines[-1]["metrics"])
    assert not (run_dir / "wandb").exists()  # logger=none (debug=smoke): nothing goes to W&B

    # Nothing new: everything is skipped and no line is added. trainer.threads (1) holds inside run_eval only.
    from clipgen.procs import torch_threads

    with torch_threads(3):
        again = run_eval(cfg)
        assert torch.get_num_threads() == 3
    assert again["evaluated"] == 0 and again["skipped"] == 2 and len(_lines(run_dir)) == 2


def test_killed_eval_resumes_without_duplicates(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    cfg, run_dir = make_fake_run(tmp_path, fake_data, epochs=3)
    run_eval(cfg)
    results = run_dir / "eval" / "results.jsonl"
    first, second = results.read_text().splitlines()[:2]
    results.write_text(first + "\n" + second[: len(second) // 2])  # killed mid-way through the second line
    out = run_eval(cfg)
    assert out["evaluated"] == 2 and out["skipped"] == 1
    lines = _lines(run_dir)
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    assert lines[0] == json.loads(first)


def test_corrupt_middle_line_is_an_error(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    cfg, run_dir = make_fake_run(tmp_path, fake_data)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.jsonl").write_text('{"task": "x"\n{"task": "y"}\n')
    with pytest.raises(ClipgenError, match="results.jsonl:1"):
        run_eval(cfg)


def test_checkpoint_of_another_architecture_is_a_clipgen_error(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    cfg, run_dir = make_fake_run(tmp_path, fake_data, epochs=1, weights_of="clipgen-tiny-vit")
    with pytest.raises(ClipgenError, match=r"epoch_000\.pt.*does not fit model 'clipgen-tiny-rn'"):
        run_eval(cfg)


def test_meta_classes_missing_from_data_is_a_clipgen_error(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    classes = sorted(FAKE_CLASSES + ["zebra"], key=domainnet_label)
    cfg, run_dir = make_fake_run(tmp_path, fake_data, epochs=1, classes=classes)
    with pytest.raises(ClipgenError, match=r"meta\.json.*zebra"):
        run_eval(cfg)


def test_changed_head_is_a_clipgen_error(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    cfg, run_dir = make_fake_run(tmp_path, fake_data, epochs=1)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "zeroshot_head.json").write_text(json.dumps({"classes": ["cat"], "templates": ["{}"]}))
    with pytest.raises(ClipgenError, match="zeroshot_head.json"):
        run_eval(cfg)


def test_missing_run_says_what_to_train(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    with pytest.raises(ClipgenError, match="clipgen-train"):
        run_eval(fake_run_cfg(tmp_path, fake_data, "cg_high"))


def test_eval_run_dir_override_and_throughput(tmp_path, fake_data, capsys):
    from clipgen.eval.run import run_eval

    _, run_dir = make_fake_run(tmp_path, fake_data, epochs=5)
    cfg = make_cfg(tmp_path, "debug=smoke", f"eval.run_dir={run_dir}", "eval.save_outputs=false")
    t0 = time.time()
    out = run_eval(cfg)
    seconds = time.time() - t0
    assert out["evaluated"] == 5 and not any((run_dir / "eval" / "outputs").iterdir())
    # a short summary: what was done, then the final checkpoint's headline next to the untrained model's
    summary = capsys.readouterr().out.strip().splitlines()
    final = json.loads((run_dir / "eval" / "results.jsonl").read_text().splitlines()[-1])
    assert len(summary) == 2 and "5 evaluations new, 0 already done" in summary[0]
    assert f"epoch 4: sketch-lso-ood {final['metrics']['sketch-lso-ood']:.4f}" in summary[1]
    assert "(epoch 0: " in summary[1]
    print(f"run_eval: 5 checkpoints x 36 images in {seconds:.1f}s")


# --- supervised baseline ---------------------------------------------------------------------------------------
def make_supervised_run(root, data_root, winners, decoy="zebra"):
    """A fake run of the supervised model whose epoch-e checkpoint predicts ``winners[e]`` for every image: its
    head is zero except a bias on that class's column 1000 + DomainNet label. Higher biases on a DomainNet class
    outside the run's classes (``decoy``) and on an ImageNet column must not matter."""
    from clipgen.models.supervised import create_supervised, supervised_payload

    cfg, run_dir = make_fake_run(root, data_root, epochs=len(winners))
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["model_kind"] = "supervised"
    (run_dir / "meta.json").write_text(json.dumps(meta))
    for epoch, winner in enumerate(winners):
        torch.manual_seed(epoch)
        model = create_supervised("clipgen-tiny-rn", 32)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
            model.head.bias[1000 + domainnet_label(winner)] = 5.0
            model.head.bias[1000 + domainnet_label(decoy)] = 50.0
            model.head.bias[3] = 100.0
        payload = supervised_payload(model, model_name="clipgen-tiny-rn", model_cfg=meta["model_cfg"], epoch=epoch,
                                     step=3 * epoch, samples_seen=96 * epoch, run_name=meta["run_name"],
                                     recipe_id=meta["recipe_id"], seed=0)
        torch.save(payload, run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt")
    return cfg, run_dir


def test_supervised_model_and_checkpoint_format(tmp_path):
    from clipgen.models.supervised import NUM_CLASSES, create_supervised, domainnet_columns, supervised_payload

    torch.manual_seed(0)
    model = create_supervised("clipgen-tiny-rn", 32).eval()  # eval: forwards leave BatchNorm statistics alone
    assert NUM_CLASSES == 1345 and model.head.in_features == 64 and model.head.out_features == 1345
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 1345)
    assert model.encode_image(torch.zeros(2, 3, 32, 32), normalize=True).norm(dim=-1).allclose(torch.ones(2))
    assert domainnet_columns(["aircraft carrier", "axe"]) == [1000, 1011]
    with pytest.raises(ClipgenError, match="'tench'.*345"):
        domainnet_columns(["tench"])
    payload = supervised_payload(model, model_name="clipgen-tiny-rn", model_cfg={"embed_dim": 64}, epoch=0, step=0,
                                 samples_seen=0, run_name="r", recipe_id="x", seed=0)
    torch.save(payload, tmp_path / "epoch_000.pt")
    back = torch.load(tmp_path / "epoch_000.pt", weights_only=True)
    assert back["kind"] == "supervised" and back["num_classes"] == 1345 and back["epoch"] == 0
    assert {"head.weight", "head.bias"} <= set(back["state_dict"]) and not any(
        k.startswith("module.") for k in back["state_dict"])
    torch.manual_seed(0)
    from clipgen.models.factory import create_clip

    clip, _ = create_clip("clipgen-tiny-rn", 32)  # same seed -> the same initial visual tower as CLIP's
    assert all(torch.equal(v, back["state_dict"][f"visual.{k}"]) for k, v in clip.visual.state_dict().items())


def test_supervised_run_is_evaluated_on_its_domainnet_columns(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    cfg, run_dir = make_supervised_run(tmp_path, fake_data, ["cat", "axe"])
    out = run_eval(cfg)
    assert out["evaluated"] == 2
    first, second = _lines(run_dir)
    assert first["model_kind"] == "supervised" and first["logit_scale"] == 1.0
    # Same keys as a CLIP run's.
    clip_keys = M.lso_metrics(np.zeros((0, 6)), np.zeros(0), [], FAKE_CLASSES, FAKE_HELDOUT, ["sketch", "real"])
    assert set(first["metrics"]) == set(clip_keys)
    # Epoch 0 predicts "cat" everywhere: 3 of the 12 in-distribution images per domain are cats.
    m = first["metrics"]
    assert m["sketch-lso-ood"] == 0.0 and m["sketch-lso-id"] == pytest.approx(0.25)
    assert m["real-lso-id"] == pytest.approx(0.25) and m["sketch-acc"] == pytest.approx(3 / 18)
    assert m["sketch-top5-ood"] == 1.0  # only "cat" scores above the true class
    # Epoch 1 predicts "axe" (held out): all 3 axe images of each domain right, bananas wrong.
    m = second["metrics"]
    assert m["sketch-lso-ood"] == pytest.approx(0.5) and m["sketch-axe-ood"] == 1.0
    assert m["sketch-banana-ood"] == 0.0 and m["sketch-lso-id"] == 0.0
    assert m["sketch-lso-unweighted-ood"] == pytest.approx(0.5) and m["real-lso-ood"] == pytest.approx(0.5)
    npz = np.load(run_dir / "eval" / "outputs" / "epoch_001.npz")
    assert npz["logits"].shape == (36, 6) and (npz["preds"] == FAKE_CLASSES.index("axe")).all()
    assert npz["image_embeddings"].shape == (36, 64)
    head = json.loads((run_dir / "eval" / "zeroshot_head.json").read_text())
    assert head["model_kind"] == "supervised" and head["templates"] == []


def test_supervised_meta_with_clip_checkpoints_is_a_clipgen_error(tmp_path, fake_data):
    from clipgen.eval.run import run_eval

    cfg, run_dir = make_fake_run(tmp_path, fake_data, epochs=1)
    meta = json.loads((run_dir / "meta.json").read_text())
    (run_dir / "meta.json").write_text(json.dumps({**meta, "model_kind": "supervised"}))
    with pytest.raises(ClipgenError, match=r"epoch_000\.pt.*'clip' checkpoint.*'supervised'"):
        run_eval(cfg)
    (run_dir / "meta.json").write_text(json.dumps({**meta, "model_kind": "linear-probe"}))
    with pytest.raises(ClipgenError, match=r"meta\.json.*'linear-probe'.*clip, supervised"):
        run_eval(cfg)


# --- ImageNet val --------------------------------------------------------------------------------------------
def write_fake_imagenet_val(tiny_root, dest, per_wnid=2, n_wnids=3):
    """Base-corpus images of the tiny world (already in ImageNet wnid folders), re-saved as JPEGs in the val
    layout ``{dest}/{wnid}/*.JPEG``, plus one folder that is not a wnid."""
    from PIL import Image

    from clipgen.facts import imagenet_class_index

    known = {wnid for wnid, _ in imagenet_class_index().values()}
    nat = layout.world_dir(make_cfg(tiny_root, "debug=smoke")) / "natural" / "train"
    wnids = sorted(p.name for p in nat.iterdir() if p.name in known)[:n_wnids]
    for wnid in wnids:
        (dest / wnid).mkdir(parents=True)
        for k, src in enumerate(sorted((nat / wnid).iterdir())[:per_wnid]):
            Image.open(src).convert("RGB").save(dest / wnid / f"ILSVRC2012_val_{k:08d}.JPEG")
    (dest / "not_a_wnid").mkdir()
    return dest, wnids


def test_imagenet_val_task(tmp_path, fake_data, tiny_root):
    from clipgen.eval.run import run_eval
    from clipgen.eval.testsets import imagenet_val_samples
    from clipgen.facts import imagenet_class_index

    val, wnids = write_fake_imagenet_val(tiny_root, tmp_path / "val")
    paths, labels = imagenet_val_samples(val)
    index = {w: i for i, (w, _) in imagenet_class_index().items()}
    assert len(paths) == 6 and sorted(set(labels.tolist())) == sorted(index[w] for w in wnids)

    # domain_free (5 templates) keeps the 1000-class head cheap enough for a test.
    _, run_dir = make_fake_run(tmp_path, fake_data, epochs=2)
    cfg = make_cfg(tmp_path, "debug=smoke", f"eval.run_dir={run_dir}", f"eval.imagenet_val_root={val}",
                   "eval.templates=domain_free")
    out = run_eval(cfg)
    assert out["evaluated"] == 4 and out["tasks"] == ["domainnet-sketch", "imagenet-val"]
    inet = [r for r in _lines(run_dir) if r["task"] == "imagenet-val"]
    assert [r["epoch"] for r in inet] == [0, 1]
    for r in inet:
        m = r["metrics"]
        assert 0.0 <= m["imagenet-top1"] <= m["imagenet-top5"] <= 1.0 and m["imagenet-n"] == 6
        assert r["num_images"] == 6 and r["test_domain"] is None
    npz = np.load(run_dir / "eval" / "outputs" / "epoch_001.imagenet-val.npz")
    assert npz["top5"].shape == (6, 5) and npz["top5"].max() < 1000 and list(npz["labels"]) == list(labels)
    head = json.loads((run_dir / "eval" / "zeroshot_head.json").read_text())
    assert len(head["imagenet_classes"]) == 1000 and head["imagenet_classes"][0] == "tench"
    assert run_eval(cfg)["skipped"] == 4

    with pytest.raises(ClipgenError, match="eval.imagenet_val_root=.*wnid"):
        run_eval(make_cfg(tmp_path, "debug=smoke", f"eval.run_dir={run_dir}",
                          f"eval.imagenet_val_root={tmp_path / 'nowhere'}"))
    (tmp_path / "empty" / "n01440764").mkdir(parents=True)
    with pytest.raises(ClipgenError, match="holds no images"):
        imagenet_val_samples(tmp_path / "empty")


# --- W&B and the training-time subset ----------------------------------------------------------------------
def test_eval_logs_into_the_training_runs_wandb_run(tmp_path, fake_data, monkeypatch):
    from wandb_records import read_offline_run

    from clipgen.eval.run import run_eval

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _, run_dir = make_fake_run(tmp_path, fake_data, epochs=2)
    meta = json.loads((run_dir / "meta.json").read_text())
    (run_dir / "meta.json").write_text(json.dumps({**meta, "wandb_id": "trainrun00000001"}))
    cfg = make_cfg(tmp_path, "debug=smoke", f"eval.run_dir={run_dir}", "logger=wandb", "logger.mode=offline",
                   "eval.save_outputs=false")
    # A run this process left open (a notebook cell, an earlier stage that raised): W&B would hand it back to
    # wandb.init and the metrics would land in it, not in the training run.
    import wandb

    stray = wandb.init(mode="offline", dir=str(tmp_path), id="strayrun00000001", project="other")
    run_eval(cfg)
    assert stray._is_finished
    got = read_offline_run(run_dir)
    assert got["run_ids"] == ["trainrun00000001"]
    assert ("eval/*", "eval/epoch") in got["metrics"]
    rows = [h for h in got["history"] if "eval/epoch" in h]
    assert [h["eval/epoch"] for h in rows] == [0, 1]
    # Past every training step (total_steps = 3), increasing with the epoch.
    assert [h["_step"] for h in rows] == [meta["total_steps"] + 1, meta["total_steps"] + 2]
    for h, rec in zip(rows, _lines(run_dir)):
        assert h["eval/domainnet-sketch/sketch-lso-ood"] == pytest.approx(rec["metrics"]["sketch-lso-ood"])
        assert h["eval/domainnet-sketch/sketch-n-ood"] == 6
    run_eval(cfg)  # nothing new: W&B is not even opened
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_subset_indices_are_stable_and_capped():
    from clipgen.eval.testsets import subset_indices

    ids = [f"sketch/cat/{i}.png" for i in range(30)] + [f"real/cat/{i}.png" for i in range(4)]
    doms = ["sketch"] * 30 + ["real"] * 4
    labels = [3] * 34
    keep = subset_indices(ids, doms, labels, 10)
    assert len(keep) == 10 + 4 and list(keep) == sorted(keep)
    assert (keep >= 30).sum() == 4  # a group smaller than k is kept whole
    order = np.random.default_rng(0).permutation(34)  # same ids in another order: same subset
    again = subset_indices([ids[i] for i in order], [doms[i] for i in order], [labels[i] for i in order], 10)
    assert sorted(ids[order[i]] for i in again) == sorted(ids[i] for i in keep)
    with pytest.raises(ClipgenError, match="eval.subset_per_class=0"):
        subset_indices(ids, doms, labels, 0)


def test_trimmed_text_and_reused_models_match_plain_open_clip(tmp_path, fake_data):
    """The two shortcuts of run_eval are exact: text encoded up to each batch's longest prompt, and checkpoints
    loaded into one reused model instead of a fresh one each."""
    from clipgen.eval.run import run_eval
    from clipgen.eval.testsets import select_test_samples
    from clipgen.eval.images import decode_images
    from clipgen.facts import zeroshot_templates
    from clipgen.models.factory import create_clip
    from clipgen.models.zeroshot import _trimmable, class_embeddings, normalize_images

    long_name = "very " * 20 + "long class"  # longer than the tiny models' 16-token context: truncated
    classes, templates = ["axe", "cat", long_name], ["a photo of a {}.", "{}", "a rendering of the big {}."]
    for name in ("clipgen-tiny-rn", "clipgen-tiny-vit"):
        torch.manual_seed(1)
        model, tok = create_clip(name, 32)
        assert _trimmable(model)
        fast = class_embeddings(model, tok, classes, templates, batch_size=4)
        with torch.no_grad():
            plain = model.encode_text(tok([t.format(c) for c in classes for t in templates]), normalize=True)
        plain = plain.view(3, 3, -1).mean(1)
        assert torch.allclose(fast, plain / plain.norm(dim=-1, keepdim=True), atol=1e-6), name

    cfg, run_dir = make_fake_run(tmp_path, fake_data, epochs=2)
    run_eval(cfg)
    meta = json.loads((run_dir / "meta.json").read_text())
    samples = select_test_samples(cfg, meta, "meta.json", ["sketch"])
    images = normalize_images(torch.from_numpy(decode_images([s.path for s in samples], 32)))
    t = zeroshot_templates("paper86")
    for epoch in (1,):  # loaded into the model that epoch 0 was loaded into
        npz = np.load(run_dir / "eval" / "outputs" / f"epoch_{epoch:03d}.npz")
        assert list(npz["sample_ids"]) == [s.sample_id for s in samples]
        model, tok = create_clip("clipgen-tiny-rn", 32)
        state = torch.load(run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt", weights_only=True)["state_dict"]
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            text = model.encode_text(tok([x.format(c) for c in FAKE_CLASSES for x in t]), normalize=True)
            text = text.view(len(FAKE_CLASSES), len(t), -1).mean(1)
            text = text / text.norm(dim=-1, keepdim=True)
            logits = (model.logit_scale.exp() * model.encode_image(images, normalize=True) @ text.T).numpy()
        assert (logits.argmax(1) == npz["preds"]).all()
        assert np.allclose(logits, npz["logits"].astype(np.float32), atol=2e-2)


def test_outputs_keys_name_every_field_of_outputs():
    """Every array an outputs file can hold is a key of the DomainNet file or of the ImageNet one, and nothing else."""
    from dataclasses import fields

    from clipgen.eval.outputs import IMAGENET_KEYS, KEYS, Outputs

    assert set(KEYS) | set(IMAGENET_KEYS) == {f.name for f in fields(Outputs)}
