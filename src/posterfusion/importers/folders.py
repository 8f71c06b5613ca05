"""One folder per genre (``Action/x.jpg``), optionally under ``train/``, ``val/``, ``test/``.

Course datasets are single-label this way; a poster filed under two genres becomes one
multi-label poster when the clean-up merges the identical files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from posterfusion.errors import PosterFusionError
from posterfusion.importers.base import Record, RowProblem, clean_genre_names

#: Top-level folder names read as a split rather than a genre, and the split they mean.
SPLITS = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
    "dev": "val", "test": "test", "testing": "test",
}


def read(source: Path, encoding: str | None = None) -> Iterator[Record | RowProblem]:
    """Records for every image under a genre folder; ``encoding`` is unused (no text file)."""
    tops = _subfolders(source)
    if not tops:
        raise PosterFusionError(
            f"{source} holds no genre folders; pass the folder with one sub-folder per genre"
        )
    if all(top.name.lower() in SPLITS for top in tops):
        for top in tops:
            yield from _genre_folders(top, SPLITS[top.name.lower()])
    else:
        yield from _genre_folders(source, None)


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PosterFusionError(f"{folder} is not a folder; the folders format takes a folder")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _genre_folders(root: Path, split: str | None) -> Iterator[Record | RowProblem]:
    from posterfusion.images import IMAGE_SUFFIXES  # numpy and PIL: not at CLI start-up

    for folder in _subfolders(root):
        try:
            genres = clean_genre_names([folder.name])
        except ValueError as error:
            yield RowProblem(folder, None, str(error))
            continue
        for file in sorted(folder.rglob("*")):
            if any(part.startswith(".") for part in file.relative_to(folder).parts):
                continue
            if not file.is_file():
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                yield RowProblem(file, None, f"not an image ({file.suffix or 'no extension'})")
                continue
            extras: dict[str, object] = {"split": split} if split else {}
            yield Record(file, None, (str(file.absolute()),), genres, extras=extras)
