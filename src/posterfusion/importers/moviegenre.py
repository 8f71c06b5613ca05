"""Kaggle "Movie Genre from its Poster" ``MovieGenre.csv``: Latin-1, posters as ``<imdbId>.jpg``.

The year is not a column there, so it comes from the title's ``(1995)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from posterfusion.importers.base import (
    Record, RowProblem, Table, TableRow, imdb_id, parse_genres, parse_year, records, source_file,
    without,
)


def read(source: Path, encoding: str | None = None) -> Iterator[Record | RowProblem]:
    """Records from ``MovieGenre.csv``, with an ``imdb_id`` column in the ``tt0114709`` form."""
    path = source_file(source, "MovieGenre.csv")
    with Table(path, encoding=encoding, latin1_fallback=True) as table:
        ident = table.column("imdbId", "imdb_id", "tconst")
        genres = table.column("Genre", "genres")
        title = table.column("Title", required=False)

        def make(row: TableRow) -> Record:
            raw = row.values[ident].strip()
            normal = imdb_id(raw)
            if normal is None:
                raise ValueError(f"imdbId {raw!r} is not an IMDb id" if raw else "no imdbId")
            return Record(
                path, row.line, (raw, str(int(normal[2:])), normal),
                parse_genres(row.values[genres]),
                year=parse_year(row.values[title]) if title else None,
                extras={**without(row.values, genres), "imdb_id": normal},
            )

        yield from records(path, table, make)
