"""Importers: the poster datasets people already have, as posterfusion manifests.

Each format module only parses its layout into :class:`Record` items; :mod:`.cleanup` does
everything else, so every format gets the same filters, genre handling, missing-image and
duplicate checks. Nothing here imports pandas at import time: the CLI loads this on start-up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from posterfusion.errors import PosterFusionError
from posterfusion.importers import folders, imdb, mmimdb, moviegenre, movielens, onehot, tmdb
from posterfusion.importers.base import ImportResult, Record, RowProblem
from posterfusion.importers.cleanup import (
    CleanupOptions,
    ImageFinder,
    clean,
    parse_merge,
    parse_title_types,
)

__all__ = [
    "IMPORTERS", "CleanupOptions", "ImportResult", "Record", "RowProblem", "import_manifest",
    "parse_merge", "parse_title_types",
]

Reader = Callable[[Path, "str | None"], Iterator["Record | RowProblem"]]

#: Format name (as typed after ``fusion manifest import``) to the reader for it.
IMPORTERS: dict[str, Reader] = {
    "tmdb": tmdb.read,
    "moviegenre": moviegenre.read,
    "imdb": imdb.read,
    "folders": folders.read,
    "mmimdb": mmimdb.read,
    "movielens": movielens.read,
    "onehot": onehot.read,
}

#: Sub-folders of the source's folder also searched for posters when ``images`` is not given.
IMAGE_FOLDERS = ("posters", "poster", "images", "image", "img", "imgs", "covers", "dataset")


def import_manifest(
    format: str,
    source: Path,
    out: Path,
    *,
    images: list[Path] | None = None,
    options: CleanupOptions | None = None,
    encoding: str | None = None,
) -> ImportResult:
    """Read ``source`` in ``format`` and clean it into a manifest meant to be written to ``out``.

    ``out`` is needed before writing because poster paths are made relative to its folder.
    """
    if format not in IMPORTERS:
        raise PosterFusionError(f"unknown format {format!r}; use one of {', '.join(IMPORTERS)}")
    if not source.exists():
        raise PosterFusionError(f"{source} does not exist; check the SOURCE path")
    if os.path.abspath(out) == os.path.abspath(source):
        raise PosterFusionError(f"--out {out} is the source file; write the manifest elsewhere")
    if images and format == "folders":
        raise PosterFusionError("--images is not used by the folders format: the genre folders "
                                "under SOURCE hold the images")
    for folder in images or []:
        if not folder.is_dir():
            raise PosterFusionError(f"--images {folder} is not a folder")
    finder = ImageFinder(list(images) if images else _image_folders(source))
    items = IMPORTERS[format](source, encoding)
    return clean(items, finder, options or CleanupOptions(), out.parent)


def _image_folders(source: Path) -> list[Path]:
    """The source's own folder and poster-like sub-folders, so ``--images`` is rarely needed."""
    base = source if source.is_dir() else source.parent
    named = [p for p in sorted(base.iterdir()) if p.is_dir() and p.name.lower() in IMAGE_FOLDERS]
    return [base, *named]
