"""A one-hot CSV: an id column naming the image and one 0/1 column per genre.

The layout of e.g. the Analytics Vidhya / Kaggle "Movie Poster" set (``Id``, ``Genre``,
``Action``, ``Adventure``...). Genre columns are recognised by their 0/1 values rather than
listed by the user, because their names are whatever genres the set has.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from posterfusion.errors import PosterFusionError
from posterfusion.importers.base import (
    Record, RowProblem, Table, TableRow, clean_genre_names, parse_year, records, source_file,
    without,
)

#: Column names taken to name the image, in order of preference.
ID_COLUMNS = (
    "id", "imdb_id", "tconst", "image", "image_id", "filename", "file", "img", "poster",
    "image_path", "path", "movie_id", "name",
)
_TRUE = frozenset({"1", "1.0", "true", "yes"})
_FALSE = frozenset({"0", "0.0", "false", "no", ""})


def read(source: Path, encoding: str | None = None) -> Iterator[Record | RowProblem]:
    """Records from a one-hot table; a cell that is neither 0 nor 1 makes its row a problem."""
    path = source_file(source, "train.csv")
    with Table(path, encoding=encoding) as table:
        rows = list(table)
    good = [row for row in rows if isinstance(row, TableRow)]
    flags = [name for name in table.columns if _is_flag_column(name, good)]
    if not flags:
        raise PosterFusionError(f"{path} has no 0/1 genre columns; is it a one-hot table?")
    others = [name for name in table.columns if name not in flags]
    named = table.column(*ID_COLUMNS, required=False)
    ident = named if named in others else (others[0] if others else None)
    if ident is None:
        raise PosterFusionError(f"{path} has no column naming the image (e.g. 'id' or 'image')")
    year = table.column("year", "startYear", "release_date", "release_year", required=False)
    kind = table.column("titleType", required=False)

    def make(row: TableRow) -> Record:
        name = row.values[ident].strip()
        if not name:
            raise ValueError(f"no image id in column {ident!r}")
        return Record(
            path, row.line, (name,), clean_genre_names([g for g in flags if _flag(row.values, g)]),
            year=parse_year(row.values[year]) if year else None,
            title_type=row.values[kind].strip() or None if kind else None,
            extras=without(row.values, *flags),
        )

    yield from records(path, rows, make)


def _is_flag_column(name: str, rows: list[TableRow]) -> bool:
    """Mostly 0/1: one mistyped cell should be reported, not turn a genre into a text column."""
    cells = [row.values[name].strip().lower() for row in rows if row.values[name].strip()]
    return bool(cells) and sum(cell in _TRUE or cell in _FALSE for cell in cells) > len(cells) / 2


def _flag(values: dict[str, str], column: str) -> bool:
    cell = values[column].strip().lower()
    if cell in _TRUE or cell in _FALSE:
        return cell in _TRUE
    raise ValueError(f"column {column!r} holds {values[column]!r}, not 0 or 1")
