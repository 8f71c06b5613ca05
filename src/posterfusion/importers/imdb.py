"""IMDb ``title.basics.tsv`` (or the ``.tsv.gz`` IMDb publishes), posters as ``<tconst>.jpg``.

The file is unquoted tab-separated text (titles contain bare ``"``) with ``\\N`` for nulls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from posterfusion.importers.base import (
    Record, RowProblem, Table, TableRow, imdb_id, parse_genres, parse_year, records, source_file,
)

_NULL = "\\N"


def read(source: Path, encoding: str | None = None) -> Iterator[Record | RowProblem]:
    """Records from an IMDb basics table; ``\\N`` becomes an empty value."""
    path = source_file(source, "title.basics.tsv", "title.basics.tsv.gz")
    with Table(path, encoding=encoding, delimiter="\t", quoting=False) as table:
        tconst = table.column("tconst")
        genres = table.column("genres")
        kind = table.column("titleType", required=False)
        start = table.column("startYear", required=False)

        def make(row: TableRow) -> Record:
            values = row.values
            raw = values[tconst].strip()
            normal = imdb_id(raw)
            if normal is None:
                raise ValueError(f"tconst {raw!r} is not an IMDb id" if raw else "no tconst")
            title_type = values[kind].strip() if kind else ""
            return Record(
                path, row.line, (raw, normal), parse_genres(values[genres]),
                year=parse_year(values[start]) if start else None,
                title_type=None if title_type in ("", _NULL) else title_type,
                extras={k: "" if v == _NULL else v for k, v in values.items() if k != genres},
            )

        yield from records(path, table, make)
