"""Manifests: which posters to work on, and their genres when known.

A manifest is a CSV with ``poster`` (a path relative to the CSV's folder, or absolute) and
``genres`` (pipe-separated, possibly empty); other columns are kept. A folder of images is a
manifest without labels. Everything downstream takes the :class:`Manifest` this module returns.
"""

from __future__ import annotations

import csv
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from .errors import PosterFusionError
from .images import IMAGE_SUFFIXES

REQUIRED_COLUMNS = ("poster",)


@dataclass
class Manifest:
    """Posters with absolute paths (column ``path``) and parsed genre lists (``genre_list``)."""

    table: pd.DataFrame
    source: Path
    labelled: bool

    def __len__(self) -> int:
        return len(self.table)

    @property
    def paths(self) -> list[str]:
        return self.table["path"].tolist()

    def genres(self) -> list[str]:
        """The genre vocabulary, most frequent first (ties by name) for stable output order."""
        counts: dict[str, int] = {}
        for genres in self.table["genre_list"]:
            for genre in genres:
                counts[genre] = counts.get(genre, 0) + 1
        return sorted(counts, key=lambda g: (-counts[g], g))

    def head(self, limit: int | None) -> "Manifest":
        if limit is None or limit >= len(self.table):
            return self
        return Manifest(self.table.iloc[:limit].reset_index(drop=True), self.source, self.labelled)


def split_genres(value: object) -> list[str]:
    """Parse a pipe-separated genre cell; blanks, NaN and '(no genres listed)' mean none."""
    if not isinstance(value, str):
        return []
    parts = [part.strip() for part in value.split("|")]
    return [part for part in parts if part and part != "(no genres listed)"]


def label_matrix(manifest: Manifest, rows: np.ndarray, genres: list[str]) -> np.ndarray:
    """0/1 genre targets of the manifest rows ``rows``, one column per genre in ``genres``."""
    index = {g: i for i, g in enumerate(genres)}
    y = np.zeros((len(rows), len(genres)), np.float32)
    for r, genre_list in enumerate(manifest.table["genre_list"].iloc[rows]):
        for g in genre_list:
            if g in index:
                y[r, index[g]] = 1.0
    return y


def load_manifest(source: str | Path) -> Manifest:
    """Read a manifest CSV or list a folder of images.

    Files that are missing or unreadable are not an error here: each poster is reported and
    skipped when it is decoded, so one bad row never stops a long run.
    """
    source = Path(source)
    if not source.exists():
        raise PosterFusionError(f"{source}: no such manifest or folder")
    if source.is_dir():
        return _from_folder(source)
    table = _read_csv(source)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PosterFusionError(
            f"{source}: manifest has no '{missing[0]}' column (columns: {', '.join(table.columns)}); "
            "it needs 'poster' (image path) and optionally 'genres' (pipe-separated)"
        )
    labelled = "genres" in table.columns
    table = table.copy()
    empty = table["poster"].isna() | (table["poster"].astype(str).str.strip() == "")
    if empty.any():
        line = int(empty.to_numpy().nonzero()[0][0]) + 2
        raise PosterFusionError(f"{source}:{line}: empty 'poster' path")
    base = source.resolve().parent
    table["path"] = [str(_resolve(base, p)) for p in table["poster"].astype(str)]
    table["genre_list"] = [split_genres(v) for v in table["genres"]] if labelled else [[]] * len(table)
    return Manifest(table.reset_index(drop=True), source, labelled)


def _resolve(base: Path, poster: str) -> Path:
    path = Path(poster.strip()).expanduser()
    return path if path.is_absolute() else base / path


def _read_csv(source: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(source, dtype=str, keep_default_na=False, na_values=[""])
    except UnicodeDecodeError:
        raise PosterFusionError(
            f"{source}: not UTF-8 text; re-save it as UTF-8 or import it with 'fusion manifest import'"
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "empty file"
        raise PosterFusionError(f"{source}: not a readable CSV manifest: {reason}") from None


def _from_folder(folder: Path) -> Manifest:
    paths = list(walk_images(folder))
    if not paths:
        raise PosterFusionError(f"{folder}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    table = pd.DataFrame(
        {
            "poster": [str(p.relative_to(folder)) for p in paths],
            "path": [str(p.resolve()) for p in paths],
        }
    )
    table["genre_list"] = [[] for _ in range(len(table))]
    return Manifest(table, folder, labelled=False)


def walk_images(folder: Path) -> Iterator[Path]:
    """The image files under ``folder``, in ``sorted(folder.rglob("*"))`` order, found as they are
    needed: a catalogue's first posters are at work before a 100,000-file walk could end.
    Symlinked folders are not entered (as ``rglob``), so a link loop cannot trap the walk."""
    with os.scandir(folder) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from walk_images(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
            yield path


def poster_list(source: str | Path) -> Iterator[str]:
    """The posters a ``--manifest`` names, one at a time: a manifest CSV (its ``poster`` column), a
    folder, or a text file of paths one per line (``-``: standard input), relative paths there
    being relative to the current folder as on a command line. Blank lines are skipped."""
    if str(source) == "-":
        yield from _lines(sys.stdin)
        return
    source = Path(source)
    if source.is_dir():
        yield from (str(p) for p in walk_images(source))
        return
    try:
        handle = open(source, encoding="utf-8", newline="")
    except OSError as exc:
        raise PosterFusionError(f"{source}: cannot read this list of posters ({exc.strerror or exc})") from None
    with handle:
        try:
            first = handle.readline()
            if "poster" in next(csv.reader([first]), []):
                handle.close()
                yield from load_manifest(source).paths
                return
            yield from _lines(itertools.chain([first], handle))
        except UnicodeDecodeError:
            raise PosterFusionError(f"{source}: not UTF-8 text; a list of posters is a CSV manifest or one path a line") from None


def _lines(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        line = line.strip()
        if line:
            yield line
