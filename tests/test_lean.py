"""Lean outputs: the tiny models' compact vocabulary and fp16 epoch checkpoints (issue 15, item 6)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cfg

from clipgen.errors import ClipgenError
from clipgen.models import vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ("clipgen-tiny-rn", "clipgen-tiny-vit")


def _pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decoder[i] for i in tokenizer.encode(text)]


def test_shipped_vocabulary_is_the_one_clipgens_texts_need():
    shipped = gzip.open(vocab.bpe_path()).read().decode("utf-8")
    assert shipped == vocab.merges_text(vocab.used_merges(vocab.clipgen_texts())), \
        "a fact changed: regenerate with python -m clipgen.models.vocab"


def test_compact_tokenizer_splits_like_open_clips_with_small_ids():
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from clipgen.models.factory import model_config, register_clipgen_models
    from clipgen.recipes.captions import make_caption

    register_clipgen_models()
    full = SimpleTokenizer()
    captions = [make_caption(42, f"s{i}", d, c) for i, (d, c) in
                enumerate([("sketch", "aircraft carrier"), ("quickdraw", "The Eiffel Tower"), ("real", "t-shirt")])]
    for name in TINY:
        tok = open_clip.get_tokenizer(name)  # by name alone, as plain open_clip users build it
        size = model_config(name)["text_cfg"]["vocab_size"]
        assert tok.vocab_size == size < 2000 and tok.eot_token_id == size - 1
        for text in vocab.clipgen_texts() + captions:
            assert _pieces(tok, text) == _pieces(full, text), text
        odd = "zyzzyva café 2024 ☃"  # words clipgen never writes still tokenize, in smaller pieces
        ids = tok([odd])[0]
        assert int(ids.max()) < size and tok.decode(tok.encode(odd)) == full.decode(full.encode(odd))
    assert "/" not in model_config("clipgen-tiny-rn")["text_cfg"]["tokenizer_kwargs"]["bpe_path"]  # portable


def test_tiny_model_is_three_times_smaller():
    from clipgen.models.factory import create_clip

    model, _ = create_clip("clipgen-tiny-rn", 32)
    assert model.token_embedding.weight.shape == (vocab.vocab_size(len(vocab.used_merges(vocab.clipgen_texts()))),
                                                  64)
    assert sum(p.numel() for p in model.parameters()) < 1.6e6  # 4.6M with the full 49,408-token vocabulary


def test_fp16_storage_keeps_integers_and_what_fp16_cannot_hold():
    from clipgen.train.checkpoint import stored_state

    state = {"w": torch.tensor([0.1, -2.5]), "big": torch.tensor([1e6, 1.0]), "n": torch.tensor(7)}
    out = stored_state(state, "fp16")
    assert out["w"].dtype == torch.float16 and out["big"].dtype == torch.float32 and out["n"].dtype == torch.int64
    assert stored_state(state, "fp32") is state


def test_unknown_checkpoint_dtype_is_a_clipgen_error(tmp_path):
    from clipgen.train.loop import run_train

    with pytest.raises(ClipgenError, match="trainer.checkpoint_dtype 'int8'"):
        run_train(make_cfg(tmp_path, "debug=smoke", "trainer.checkpoint_dtype=int8"))


@pytest.mark.slow
def test_fp16_checkpoints_load_in_open_clip_and_evaluate_like_fp32(tiny_root):
    """A run saved with trainer.checkpoint_dtype=fp16: its last epoch checkpoint is half the size, loads in plain
    open_clip, and clipgen-eval's predictions from it match those of the float32 weights (latest.pt) on all but
    near-ties (fp16 keeps ~3 significant digits)."""
    import open_clip

    from clipgen.eval.run import run_eval
    from clipgen.models.factory import register_clipgen_models
    from clipgen.train.loop import run_train

    cfg = make_cfg(tiny_root, "debug=smoke", "recipe=cg_low", "trainer.checkpoint_dtype=fp16",
                   "run_name=test-lean-fp16")
    run = Path(run_train(cfg)["run_dir"])
    last, latest = run / "checkpoints" / "epoch_002.pt", run / "latest.pt"
    half = torch.load(last, weights_only=True)["state_dict"]
    exact = torch.load(latest, weights_only=True)["state_dict"]
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    assert all(exact[k].dtype == torch.float32 for k in half if half[k].is_floating_point())  # resume stays exact

    register_clipgen_models()
    plain, _, _ = open_clip.create_model_and_transforms("clipgen-tiny-rn", pretrained=str(last))
    assert all(torch.equal(plain.state_dict()[k], half[k].to(plain.state_dict()[k].dtype)) for k in half)

    run_eval(make_cfg(tiny_root, "debug=smoke", f"eval.run_dir={run}"))
    from_fp16 = np.load(run / "eval" / "outputs" / "epoch_002.npz")
    # The same run's weights in float32: move latest.pt in as the epoch-2 checkpoint of a copy of the run.
    other = run.with_name("test-lean-fp32")
    (other / "checkpoints").mkdir(parents=True)
    for f in ("meta.json", "config.yaml"):
        (other / f).write_bytes((run / f).read_bytes())
    torch.save({**torch.load(last, weights_only=True), "state_dict": exact}, other / "checkpoints" / "epoch_002.pt")
    run_eval(make_cfg(tiny_root, "debug=smoke", f"eval.run_dir={other}"))
    from_fp32 = np.load(other / "eval" / "outputs" / "epoch_002.npz")
    assert list(from_fp16["sample_ids"]) == list(from_fp32["sample_ids"])
    agree = float(np.mean(from_fp16["preds"] == from_fp32["preds"]))
    gap = float(np.abs(from_fp16["logits"].astype(np.float32) - from_fp32["logits"].astype(np.float32)).max())
    assert agree >= 0.98 and gap < 0.5, (agree, gap)


def test_run_saved_with_the_full_vocabulary_is_not_resumed(tmp_path):
    """A run directory from before the compact vocabulary (its latest.pt records another model config) is refused
    with one line instead of a tensor-shape stack trace."""
    from clipgen.train.loop import run_train
    from clipgen.files import atomic_torch_save

    over = ("debug=smoke", "recipe=cg_low", "trainer.max_steps=2")
    run = Path(run_train(make_cfg(tmp_path, *over))["run_dir"])
    latest = torch.load(run / "latest.pt", weights_only=True)
    latest["model_cfg"]["text_cfg"]["vocab_size"] = 49408
    atomic_torch_save(latest, run / "latest.pt")
    with pytest.raises(ClipgenError, match="latest.pt.*belongs to a run with other settings"):
        run_train(make_cfg(tmp_path, *over[:2]))
