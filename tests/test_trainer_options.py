"""The supervised baseline on the shared loop, micro-batching, gradient checkpointing and channels-last: each
trains on the tiny world, resumes, and (for the memory/speed options) gives the model the plain run gives."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from clipgen.errors import ClipgenError
from clipgen.models.supervised import NUM_CLASSES
from clipgen.train.loop import run_train
from clipgen.train.objective import supervised_labels
from clipgen.train.optim import step_lr_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMOKE = ("debug=smoke", "recipe=cg_high", "trainer.threads=1")


def _copy_world(tiny_root, dest: Path) -> Path:
    shutil.copytree(Path(tiny_root) / "world", dest / "world")
    return dest


def _sd(run_dir: Path, name: str) -> dict:
    return torch.load(Path(run_dir) / name, weights_only=True)


def test_supervised_baseline_trains_resumes_and_is_evaluated(tiny_root, tmp_path):
    over = (*SMOKE, "trainer=supervised", "trainer.epochs=3", "trainer.save_every_epochs=2", "optim.lr=0.05")
    full = run_train(make_cfg(tiny_root, *over, "run_name=test-sup-full"))
    run = Path(full["run_dir"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_000.pt", "epoch_002.pt",
                                                                        "epoch_003.pt"]  # init, every 2, last
    last = _sd(run, "checkpoints/epoch_003.pt")
    assert last["kind"] == "supervised" and last["num_classes"] == NUM_CLASSES
    assert {k.split(".")[0] for k in last["state_dict"]} == {"visual", "head"}
    meta = json.loads((run / "meta.json").read_text())
    assert meta["model_kind"] == "supervised" and meta["status"] == "finished"
    first = _sd(run, "checkpoints/epoch_000.pt")["state_dict"]
    assert any(not torch.equal(first[k], last["state_dict"][k]) for k in first)

    # Interrupted after 4 steps and resumed: bit for bit the uninterrupted run.
    root = _copy_world(tiny_root, tmp_path)
    part = run_train(make_cfg(root, *over, "run_name=test-sup-full", "trainer.max_steps=4"))
    assert part["status"] == "running" and part["steps"] == 4
    group = _sd(Path(part["run_dir"]), "latest.pt")["optimizer"]["param_groups"][0]
    assert group["nesterov"] and group["momentum"] == 0.9  # SGD with Nesterov momentum (optim=sgd_step)
    done = run_train(make_cfg(root, *over, "run_name=test-sup-full"))
    assert done["status"] == "finished" and done["final_loss"] == full["final_loss"]
    resumed = _sd(Path(done["run_dir"]), "checkpoints/epoch_003.pt")["state_dict"]
    assert all(torch.equal(resumed[k], last["state_dict"][k]) for k in resumed)

    # clipgen-eval reads the supervised run through its DomainNet columns.
    from clipgen.eval.run import run_eval

    out = run_eval(make_cfg(tiny_root, *over, f"eval.run_dir={run}", "eval.save_outputs=false"))
    assert out["evaluated"] == 3 and 0.0 <= out["final"]["sketch-lso-id"] <= 1.0


def test_supervised_targets_follow_the_spec():
    meta = {"sample_id": ["sketch/cat/1", "base/n01440764/x", "base/dn017/y", "cc/00001/k"],
            "label": ["60", "-1", "17", "-1"], "source": ["domainnet", "imagenet_captions", "world_base", "cc"]}
    with pytest.raises(ClipgenError, match=r"'cc/00001/k'.*no supervised label.*not cc"):
        supervised_labels(meta, "recipe")
    labels = supervised_labels({k: v[:3] for k, v in meta.items()}, "recipe")
    assert labels.tolist() == [1000 + 60, 0, 1000 + 17]  # DomainNet -> 1000 + label; ImageNet tench -> 0


def test_step_schedule_by_hand():
    lr = [step_lr_at(s, 0.01, 0, 10, [30, 50, 70], 0.1) for s in (0, 299, 300, 499, 500, 700, 899)]
    assert lr == pytest.approx([0.01, 0.01, 0.001, 0.001, 1e-4, 1e-5, 1e-5])
    assert step_lr_at(1, 0.01, 4, 10, [1], 0.1) == pytest.approx(0.005)  # warmup first


def _outputs(path: Path, model_name: str):
    import open_clip

    from clipgen.models.factory import register_clipgen_models

    register_clipgen_models()
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path))
    model.eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(model_name)(["a sketch of a cat", "a photo of a bus"])
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.mark.parametrize("model, options, tol", [
    ("tiny_vit", ("trainer.accum_steps=4",), 1e-5),  # LayerNorm only: micro-batches give the full-batch gradient
    ("tiny_rn", ("trainer.grad_checkpointing=true",), 1e-5),  # BatchNorm statistics counted once
    ("tiny_rn", ("trainer.channels_last=true",), 1e-3),  # other convolution kernels: rounding, amplified by Adam
])
def test_memory_options_leave_the_model_unchanged(tiny_root, model, options, tol):
    over = (*SMOKE, f"model={model}", "trainer.max_steps=6")
    plain = run_train(make_cfg(tiny_root, *over, f"run_name=test-opt-{model}-plain"))  # a no-op when it exists
    option = options[0].split(".")[1].split("=")[0]
    other = run_train(make_cfg(tiny_root, *over, *options, f"run_name=test-opt-{model}-{option}"))
    assert plain["steps"] == other["steps"] == 6 and abs(plain["final_loss"] - other["final_loss"]) < 1e-3
    name = f"clipgen-tiny-{model.split('_')[1]}"
    a = _outputs(Path(plain["run_dir"]) / "latest.pt", name)
    b = _outputs(Path(other["run_dir"]) / "latest.pt", name)
    init = _outputs(Path(plain["run_dir"]) / "checkpoints" / "epoch_000.pt", name)
    gap = max(float((x - y).abs().max()) for x, y in zip(a, b))
    moved = max(float((x - y).abs().max()) for x, y in zip(a, init))
    assert gap < tol and moved > 100 * gap, (gap, moved)


def test_accum_steps_must_divide_the_batch(tmp_path):
    with pytest.raises(ClipgenError, match="accum_steps=5 does not divide the per-process batch 32"):
        run_train(make_cfg(tmp_path, *SMOKE, "trainer.accum_steps=5"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("preset", ["rn50", "vit_s_32", "vit_b_32", "swin_t", "tiny_rn", "tiny_vit"])
def test_model_presets_build_offline_and_round_trip(preset, tmp_path):
    """Every conf/model preset builds a random-init open_clip model without any download, and its epoch
    checkpoint loads back through plain open_clip.create_model_and_transforms."""
    import open_clip

    from clipgen.models.checkpoint import epoch_payload
    from clipgen.models.factory import create_clip, model_config

    cfg = make_cfg(tmp_path, f"model={preset}")
    model, tokenizer = create_clip(cfg.model.name, cfg.model.image_px)
    assert tokenizer(["a sketch of a cat"]).shape[0] == 1
    payload = epoch_payload(model, model_name=cfg.model.name, model_cfg=model_config(cfg.model.name), epoch=0,
                            step=0, samples_seen=0, run_name="r", recipe_id="x", seed=0)
    path = tmp_path / "epoch_000.pt"
    torch.save(payload, path)
    loaded, _, _ = open_clip.create_model_and_transforms(cfg.model.name, pretrained=str(path))
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_supervised_micro_batches_give_the_full_batch_gradient(tiny_root):
    """trainer.accum_steps splits the batch, not the loss: the supervised objective's loss, accuracy and
    gradient over 4 micro-batches are those over the whole batch (tiny ViT: LayerNorm only, no batch statistics)."""
    import contextlib

    import open_clip

    from clipgen.recipes.build import ensure_recipe
    from clipgen.train.data import EpochLoader, load_train_data
    from clipgen.train.objective import objective_for

    cfg = make_cfg(tiny_root, *SMOKE, "trainer=supervised", "model=tiny_vit")
    recipe_dir = Path(ensure_recipe(cfg))
    objective = objective_for(cfg.trainer.objective)
    model, tokenizer = objective.create_model(cfg.model.name, cfg.model.image_px)
    assert tokenizer is None  # no text tower
    data = load_train_data(recipe_dir, open_clip.get_tokenizer(cfg.model.name), int(cfg.model.image_px))
    objective.prepare_data(data, recipe_dir)
    batch = next(EpochLoader(data, 16, 0, int(cfg.model.image_px)).batches(0))
    results = []
    for accum in (1, 4):
        model.zero_grad(set_to_none=True)
        loss, acc = objective.backward(model, batch.images, batch, accum, contextlib.nullcontext, lambda x: x)
        results.append((loss, acc, [p.grad.clone() for p in model.parameters()]))
    (loss1, acc1, grad1), (loss4, acc4, grad4) = results
    assert abs(loss1 - loss4) < 1e-5 and acc1 == acc4 and objective.stat == "acc"
    assert max(float((a - b).abs().max()) for a, b in zip(grad1, grad4)) < 1e-5
    assert max(float(g.abs().max()) for g in grad1) > 1e-3  # a gradient to compare, not zeros


def test_a_model_built_for_a_checkpoint_loads_it_exactly_and_random_init_comes_back():
    """load_checkpoint builds its model under weights_to_be_loaded (no random weights drawn): after the strict load
    every parameter, buffer and output is the checkpoint's; afterwards torch.nn.init draws again."""
    from torch.nn import init

    from clipgen.models.factory import create_clip, weights_to_be_loaded

    torch.manual_seed(0)
    trained, tokenizer = create_clip("clipgen-tiny-rn")
    drawn = init.normal_
    with weights_to_be_loaded():
        assert init.normal_ is not drawn
        built, _ = create_clip("clipgen-tiny-rn")
    assert init.normal_ is drawn
    built.load_state_dict(trained.state_dict(), strict=True)
    for (name, a), (_, b) in zip(trained.named_buffers(), built.named_buffers()):
        assert torch.equal(a, b), name  # the attention mask, not in the state_dict, is built as usual
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(["a sketch of a cat", "a photo of a bus"])
    trained.eval(), built.eval()
    with torch.no_grad():
        assert torch.equal(trained(images, tokens)["image_features"], built(images, tokens)["image_features"])
        assert torch.equal(trained(images, tokens)["text_features"], built(images, tokens)["text_features"])
    torch.manual_seed(0)
    again, _ = create_clip("clipgen-tiny-rn")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))
