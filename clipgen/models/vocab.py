"""The tiny models' compact BPE vocabulary (``clipgen/resources/clipgen-tiny-bpe.txt.gz``).

open_clip's tokenizer has 49,408 tokens; clipgen's texts (DomainNet class names, recipe and synthetic-world
captions, zero-shot templates, domain words) use a few hundred of them. A 64-wide tiny model spends 3.2M of its
4.6M parameters (and a dense AdamW update every step) on the unused rows. The compact file keeps exactly the
merges of open_clip's BPE that these texts use, in open_clip's rank order, so open_clip's own ``SimpleTokenizer``
(``tokenizer_kwargs.bpe_path`` in the model config) splits every such word into the same pieces as the full
tokenizer, only with smaller ids. Any other text still tokenizes (into shorter pieces, down to single bytes).

Regenerate after changing a fact the texts come from (a test fails until you do):

    python -m clipgen.models.vocab
"""
from __future__ import annotations

import gzip
import sys
from importlib import resources

BPE_FILE = "clipgen-tiny-bpe.txt.gz"  # in clipgen/resources; the tiny model configs name it by this file name
_HEADER = "#version: 0.2 (clipgen tiny vocabulary: open_clip's merges used by clipgen's texts)"


def bpe_path() -> str:
    return str(resources.files("clipgen.resources").joinpath(BPE_FILE))


def clipgen_texts() -> list[str]:
    """Every text clipgen itself writes or prompts with, for all 345 DomainNet classes (a run of a tiny model on
    real DomainNet classes keeps whole-word tokens for its class names)."""
    from clipgen import facts
    from clipgen.world import generate as world

    classes = list(facts.domainnet_classes())
    terms = list(facts.NEUTRAL_TERMS) + [t for pair in facts.DOMAIN_TERMS.values() for t in pair]
    texts = classes + terms + list(facts._DOMAIN_WORDS) + ["an ", "a ", ". ; "]
    texts += [t.format(art="", term="", cls="") for t in facts.CAPTION_TEMPLATES]
    texts += [t.format("") for t in facts.zeroshot_templates("paper86")]
    texts += list(world._ADJ) + list(world._FILLER_TITLES) + list(world._TAGS) + ["IMG_1234"]
    texts += [t.format(c="") for t in world._DESC_WITH] + list(world._DESC_WITHOUT)
    return texts


def used_merges(texts: list[str]) -> list[tuple[str, str]]:
    """The merges of open_clip's full BPE that tokenizing ``texts`` applies, in their original rank order."""
    from open_clip.tokenizer import SimpleTokenizer

    full = SimpleTokenizer()
    used: set[tuple[str, str]] = set()
    for text in texts:
        for piece in full.pat.findall(full.clean_fn(text)):
            piece = "".join(full.byte_encoder[b] for b in piece.encode("utf-8"))
            used.update(_trace(piece, full.bpe_ranks))
    return sorted(used, key=full.bpe_ranks.__getitem__)


def _trace(piece: str, ranks: dict) -> list[tuple[str, str]]:
    # open_clip's SimpleTokenizer.bpe, recording each merge it applies.
    word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
    applied = []
    while len(word) > 1:
        pairs = set(zip(word, word[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        applied.append(best)
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return applied


def merges_text(merges: list[tuple[str, str]]) -> str:
    # No final newline: SimpleTokenizer would read the empty last line as a merge (an empty token).
    return "\n".join([_HEADER] + [f"{a} {b}" for a, b in merges])


def vocab_size(n_merges: int) -> int:
    """SimpleTokenizer's vocabulary: 256 bytes, 256 word-final bytes, the merges, <start_of_text>, <end_of_text>."""
    return 512 + n_merges + 2


def write(path: str) -> int:
    merges = used_merges(clipgen_texts())
    # mtime=0: the same merges give the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(merges_text(merges).encode("utf-8"))
    return vocab_size(len(merges))


def main() -> int:
    size = write(bpe_path())
    print(f"wrote {bpe_path()}: vocab_size {size} (set text_cfg.vocab_size of the tiny model configs to it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
