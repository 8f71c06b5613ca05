"""The clean-up every import gets, whatever the format it came from.

Readers hand over raw :class:`Record` items; this module filters them by year and title type,
finds their image files, unifies and merges genre names, removes duplicate images and handles
rare genres, in that order, so that genre counts describe the posters actually written.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from posterfusion.errors import PosterFusionError
from posterfusion.importers.base import (
    ImportResult,
    Record,
    RowProblem,
    display_path,
)

if TYPE_CHECKING:
    import pandas as pd

#: The genre that ``--other-below`` folds rare genres into.
OTHER = "Other"

_KIND_ORDER = {"malformed": 0, "missing": 1, "duplicate": 2}

#: Source columns renamed ``source_<name>``: the manifest and its loader own these names.
_RESERVED = frozenset({"poster", "genres", "path", "genre_list"})


@dataclass(frozen=True)
class CleanupOptions:
    """The user's clean-up choices; the defaults change nothing but missing files and duplicates."""

    min_year: int | None = None
    max_year: int | None = None
    title_types: frozenset[str] = frozenset()
    merge: dict[str, str] = field(default_factory=dict)
    drop_below: int = 0
    other_below: int = 0

    def __post_init__(self) -> None:
        if self.drop_below and self.other_below:
            raise PosterFusionError(
                "--drop-below and --other-below both decide what happens to rare genres; pass one"
            )
        if self.drop_below < 0 or self.other_below < 0:
            raise PosterFusionError("--drop-below and --other-below take a number of posters >= 0")
        low, high = self.min_year, self.max_year
        if low is not None and high is not None and low > high:
            raise PosterFusionError(f"--min-year {low} is after --max-year {high}")


def parse_merge(rules: Iterable[str]) -> dict[str, str]:
    """``"Music,Musical=Music"`` as ``{"music": "Music", "musical": "Music"}``.

    Keys are case-folded so users need not match the source's spelling; an empty target
    (``"Short,News="``) drops those genres. ``;`` separates rules given in one option.
    """
    merge: dict[str, str] = {}
    for rule in (part for text in rules for part in text.split(";")):
        if not rule.strip():
            continue
        sources, sep, target = rule.partition("=")
        names = [name.strip() for name in sources.split(",") if name.strip()]
        if not sep or not names:
            raise PosterFusionError(
                f"--merge {rule!r} is not 'Old,Other=New' (names to merge, '=', the new name)"
            )
        for name in names:
            merge[" ".join(name.split()).casefold()] = " ".join(target.split())
    return merge


def parse_title_types(text: str | None) -> frozenset[str]:
    """``"movie, tvMovie"`` as a case-folded set, because IMDb's camelCase is easy to mistype."""
    return frozenset(part.strip().casefold() for part in (text or "").split(",") if part.strip())


class ImageFinder:
    """Finds a poster from the names a row suggests, whatever its extension or letter case.

    Folders are listed once, so a table of 45,000 rows costs one directory scan, not 45,000
    failed ``stat`` calls for every extension a poster might have.
    """

    def __init__(self, folders: list[Path]) -> None:
        from posterfusion.images import IMAGE_SUFFIXES  # numpy and PIL: not at CLI start-up

        self._suffixes = IMAGE_SUFFIXES
        self.folders = folders
        self._index: dict[str, Path] | None = None
        self._where = ", ".join(display_path(folder) for folder in folders) or "nowhere"

    def __str__(self) -> str:
        return self._where

    def _names(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for folder in self.folders:
                try:
                    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
                except OSError:
                    continue
                for entry in entries:
                    stem, suffix = os.path.splitext(entry.name.lower())
                    if suffix in self._suffixes and entry.is_file():
                        self._index.setdefault(entry.name.lower(), Path(entry.path))
                        self._index.setdefault(stem, Path(entry.path))
        return self._index

    def find(self, candidates: Iterable[str]) -> Path | None:
        """The first candidate that exists: a path, a file name, or a name without extension."""
        for name in candidates:
            if not name:
                continue
            if os.path.isabs(name) or "/" in name or os.sep in name:
                paths = [Path(name)] if os.path.isabs(name) else [f / name for f in self.folders]
                found = next((path for path in paths if path.is_file()), None)
            else:
                key = name.lower()
                stem, suffix = os.path.splitext(key)
                found = self._names().get(key) or (
                    self._names().get(stem) if suffix in self._suffixes else None
                )
            if found is not None:
                return found
        return None


def clean(
    items: Iterable[Record | RowProblem],
    finder: ImageFinder,
    options: CleanupOptions,
    out_dir: Path,
) -> ImportResult:
    """Turn a reader's output into the manifest a user trains on, keeping every skipped row."""
    problems: list[RowProblem] = []
    kept: list[tuple[Record, Path]] = []
    filtered = 0
    for item in items:
        if isinstance(item, RowProblem):
            problems.append(item)
        elif not _passes_filters(item, options):
            filtered += 1
        else:
            path = _image(item, finder, problems)
            if path is not None:
                kept.append((item, path))
    _rename_genres([record for record, _ in kept], options.merge)
    kept = _deduplicate(kept, problems)
    threshold = options.drop_below or options.other_below
    rare_into = OTHER if options.other_below else None
    rare = _fold_rare([record for record, _ in kept], threshold, rare_into)
    problems.sort(key=lambda p: (_KIND_ORDER[p.kind], str(p.file), p.line or 0))
    return ImportResult(_manifest(kept, out_dir), problems, filtered, rare, rare_into)


def _passes_filters(record: Record, options: CleanupOptions) -> bool:
    if options.min_year is not None or options.max_year is not None:
        if record.year is None:
            return False
        if options.min_year is not None and record.year < options.min_year:
            return False
        if options.max_year is not None and record.year > options.max_year:
            return False
    if options.title_types:
        return (record.title_type or "").casefold() in options.title_types
    return True


def _image(record: Record, finder: ImageFinder, problems: list[RowProblem]) -> Path | None:
    path = finder.find(record.images)
    if path is None:
        names = ", ".join(name for name in record.images if name) or "no file name"
        reason = f"image not found ({names} in {finder})"
    elif os.path.getsize(path) == 0:
        reason = f"image file is empty: {display_path(path)}"
    else:
        return path
    problems.append(RowProblem(record.file, record.line, reason, "missing"))
    return None


def _rename_genres(records: list[Record], merge: dict[str, str]) -> None:
    """One spelling per genre (the most common, or the user's merge target), then the merges."""
    spellings: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        for name in record.genres:
            spellings[name.casefold()][name] += 1
    canonical = {key: counts.most_common(1)[0][0] for key, counts in spellings.items()}
    canonical.update({target.casefold(): target for target in merge.values() if target})
    for record in records:
        names = (merge.get(name.casefold(), canonical[name.casefold()]) for name in record.genres)
        record.genres = list(dict.fromkeys(name for name in names if name))


def _deduplicate(
    kept: list[tuple[Record, Path]], problems: list[RowProblem]
) -> list[tuple[Record, Path]]:
    """Keep the first of identical image files, with the union of their genres.

    The union is what a folder-per-genre dataset means when it files one poster under two
    genres. Files are hashed only when another file has the same size, which few do.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    for index, (_, path) in enumerate(kept):
        by_size[path.stat().st_size].append(index)
    digest: dict[int, str] = {}
    for indexes in by_size.values():
        if len(indexes) > 1:
            for index in indexes:
                digest[index] = hashlib.sha256(kept[index][1].read_bytes()).hexdigest()
    first: dict[str, Record] = {}
    unique: list[tuple[Record, Path]] = []
    for index, (record, path) in enumerate(kept):
        original = first.setdefault(digest.get(index, f"#{index}"), record)
        if original is record:
            unique.append((record, path))
            continue
        original.genres = list(dict.fromkeys(original.genres + record.genres))
        where = display_path(original.file) + ("" if original.line is None else f":{original.line}")
        reason = f"same image as {where}; genres merged"
        problems.append(RowProblem(record.file, record.line, reason, "duplicate"))
    return unique


def _fold_rare(records: list[Record], threshold: int, into: str | None) -> dict[str, int]:
    """Drop genres with fewer than ``threshold`` posters, or rename them ``into``."""
    counts = Counter(name for record in records for name in record.genres)
    rare = {name: n for name, n in counts.most_common() if n < threshold}
    if rare:
        for record in records:
            names = ((into if name in rare else name) for name in record.genres)
            record.genres = list(dict.fromkeys(name for name in names if name))
    return rare


def _manifest(kept: list[tuple[Record, Path]], out_dir: Path) -> pd.DataFrame:
    import pandas as pd

    has_year = any(record.year is not None for record, _ in kept)
    rows = []
    for record, path in kept:
        row = {
            (f"source_{key}" if key in _RESERVED else key): value
            for key, value in record.extras.items()
        }
        row.update(poster=poster_path(path, out_dir), genres="|".join(record.genres))
        if has_year:
            row["year"] = record.year
        rows.append(row)
    front = ["poster", "genres", "year"] if has_year else ["poster", "genres"]
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(front + [k for r in rows for k in r])))
    if has_year:
        frame["year"] = frame["year"].astype("Int64")
    text = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    frame[text] = frame[text].fillna("")  # a key one source file lacks is an empty cell
    return frame


def poster_path(path: Path, out_dir: Path) -> str:
    """``path`` relative to the manifest's folder when it lies inside it, else absolute.

    Inside-only, because a manifest beside (or above) its posters still works after the folder
    is moved or copied, while ``../../data/x.jpg`` would break as soon as either moves.
    """
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute, os.path.abspath(out_dir))
    except ValueError:  # another drive on Windows
        return absolute
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return absolute
    return Path(relative).as_posix()
