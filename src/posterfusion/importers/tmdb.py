"""TMDb / "The Movies Dataset" ``movies_metadata.csv`` (also ``tmdb_5000_movies.csv``).

Posters are looked up by the ``poster_path`` file name, then by TMDb id and IMDb id, because
download scripts name files either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from posterfusion.importers.base import (
    Record, RowProblem, Table, TableRow, imdb_id, parse_genres, parse_year, records, source_file,
    without,
)


def read(source: Path, encoding: str | None = None) -> Iterator[Record | RowProblem]:
    """Records from a TMDb metadata table; shifted or unparseable rows become problems."""
    path = source_file(source, "movies_metadata.csv", "tmdb_5000_movies.csv")
    with Table(path, encoding=encoding) as table:
        genres = table.column("genres")
        poster = table.column("poster_path", required=False)
        tmdb_id = table.column("id", "tmdb_id", required=False)
        imdb = table.column("imdb_id", required=False)
        date = table.column("release_date", "year", required=False)

        def make(row: TableRow) -> Record:
            values = row.values
            number = values[tmdb_id].strip() if tmdb_id else ""
            if number and not number.isdigit():
                raise ValueError(f"id {number!r} is not a TMDb id (are the columns shifted?)")
            names = (
                values[poster].strip().rsplit("/", 1)[-1] if poster else "",
                number,
                imdb_id(values[imdb]) or "" if imdb else "",
            )
            if not any(names):
                raise ValueError("no poster_path, id or imdb_id to find the poster by")
            return Record(
                path, row.line, names, parse_genres(values[genres]),
                year=parse_year(values[date]) if date else None,
                extras=without(values, genres),
            )

        yield from records(path, table, make)
