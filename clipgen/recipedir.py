"""The recipe directory (and the base directory it references): its files, and reading them.

Every stage reaches a recipe directory through this module; no other module spells its file names
(clipgen/FORMATS.md describes their contents):

    {root}/recipes/{recipe_id}-{hash}/   shard-NNNNN.tar  the samples, webdataset tars      shard_name, shards
                                         sizes.json       {shard: count}, for open_clip      sizes_path
                                         manifest.json    what the recipe holds (written     manifest_path, is_built,
                                                          last)                              read_manifest, write
                                         index-{key}/     the sample index (clipgen.data.sampleindex owns it)
    {root}/recipes/base-{hash}/          the same for the base corpus, which every recipe's manifest references by
                                         its path relative to the recipe (``base.dir``)     base_dir, sources

The directories' names and places under paths.root are clipgen.layout's and clipgen.recipes.build's.
"""
from __future__ import annotations

from pathlib import Path

from clipgen.errors import ClipgenError
from clipgen.files import atomic_write_json, read_json
from clipgen.hashing import sha256_file

MANIFEST, SIZES = "manifest.json", "sizes.json"


def shard_name(i: int) -> str:
    return f"shard-{int(i):05d}.tar"


def manifest_path(directory: str | Path) -> Path:
    return Path(directory) / MANIFEST


def sizes_path(directory: str | Path) -> Path:
    return Path(directory) / SIZES


def is_built(directory: str | Path) -> bool:
    """A finished build: its manifest, written last, exists."""
    return manifest_path(directory).is_file()


def read_manifest(directory: str | Path, what: str = "recipe manifest") -> dict:
    return read_json(manifest_path(directory), what)


def read_sizes(directory: str | Path) -> dict:
    return read_json(sizes_path(directory), "shard sizes")


def manifest_sha256(directory: str | Path) -> str:
    return sha256_file(manifest_path(directory))


def write(directory: str | Path, sizes: dict[str, int], manifest: dict) -> None:
    """sizes.json, then manifest.json (last: a directory with a manifest is a finished build)."""
    atomic_write_json(sizes_path(directory), sizes)
    atomic_write_json(manifest_path(directory), manifest)


def base_dir(recipe_dir: str | Path, manifest: dict) -> Path | None:
    """The base directory a recipe references, None when it has none (data.base=none)."""
    base = manifest.get("base")
    return (Path(recipe_dir) / base["dir"]).resolve() if base else None


def shards(where: Path, listed: dict | None) -> dict[str, int]:
    """``{shard name: count}`` from a manifest's ``shards``, in name order (= write order)."""
    if not isinstance(listed, dict):
        raise ClipgenError(f"manifest of {str(where)!r} has shards={listed!r}: expected {{name: count}}")
    return {name: int(listed[name]) for name in sorted(listed)}


def sources(recipe_dir: str | Path, manifest: dict) -> list[tuple[Path, dict[str, int], int]]:
    """(directory, {shard name: count}, num_samples) of the recipe and of the base corpus it references."""
    recipe_dir = Path(recipe_dir)
    out = [(recipe_dir, shards(recipe_dir, manifest.get("shards")), int(manifest["num_samples"]))]
    base = manifest.get("base")
    if base:
        d = base_dir(recipe_dir, manifest)
        out.append((d, shards(d, base.get("shards")), int(base["num_samples"])))
    return out


def find(recipe_dir: str | Path, run_dir: Path) -> Path | None:
    """The recipe directory a run's meta.json names (``recipe_dir``), also when it was recorded relative to the
    run or the whole paths.root has moved since; None when none of those places holds a built recipe."""
    given = Path(recipe_dir)
    candidates = [given] + ([run_dir / given] if not given.is_absolute() else [])
    candidates.append(Path(run_dir).parent.parent / "recipes" / given.name)  # a moved paths.root
    return next((c for c in candidates if is_built(c)), None)
