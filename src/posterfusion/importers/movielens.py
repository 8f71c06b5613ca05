"""MovieLens (ml-25m, ml-latest...): ``movies.csv`` for titles and genres, ``links.csv`` for IMDb ids.

MovieLens has no posters, but poster collections named by IMDb id (``tt0114709.jpg``) do; this
reader joins the two, so a user can label such a collection with MovieLens' 18 genres the way the
project's extra training posters were (README, "Training on more posters").

Titles are written as people read them: "American President, The (1995)" becomes "The American
President" (year in its own column), because the word model learns from titles.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from posterfusion.errors import PosterFusionError
from posterfusion.importers.base import (
    Record, RowProblem, Table, TableRow, imdb_id, parse_genres, parse_year, records, source_file,
)

NOT_GENRES = frozenset({"imax"})
"""MovieLens tags some films with the format they were shown in; it says nothing of the genre."""
_TRAILING_YEAR = re.compile(r"\s*\((?:1[89]\d\d|2[01]\d\d)(?:[-–]\d*)?\)\s*$")
_TRAILING_ARTICLE = re.compile(r"^(.*), (The|A|An)$")


def plain_title(title: str) -> str:
    """"Usual Suspects, The (1995)" -> "The Usual Suspects"; alternative titles in parentheses
    are kept as they are."""
    base = _TRAILING_YEAR.sub("", title).strip()
    moved = _TRAILING_ARTICLE.match(base)
    return f"{moved.group(2)} {moved.group(1)}" if moved else base


def read(source: Path, encoding: str | None = None) -> Iterator[Record | RowProblem]:
    """Records from ``movies.csv`` joined on ``movieId`` with the ``links.csv`` beside it."""
    movies = source_file(source, "movies.csv")
    links_path = movies.parent / "links.csv"
    if not links_path.is_file():
        raise PosterFusionError(f"{movies}: no links.csv beside it (MovieLens' table of IMDb ids); "
                                "pass the folder MovieLens unpacked into")
    links: dict[str, tuple[str, str]] = {}
    with Table(links_path, encoding=encoding) as table:
        movie, imdb, tmdb = table.column("movieId"), table.column("imdbId"), table.column("tmdbId", required=False)
        for row in table:
            if isinstance(row, TableRow):
                links[row.values[movie].strip()] = (row.values[imdb].strip(), row.values[tmdb].strip() if tmdb else "")
    with Table(movies, encoding=encoding) as table:
        movie, title, genres = table.column("movieId"), table.column("title"), table.column("genres")

        def make(row: TableRow) -> Record:
            key = row.values[movie].strip()
            imdb_raw, tmdb_id = links.get(key, ("", ""))
            normal = imdb_id(imdb_raw)
            if normal is None:
                raise ValueError(f"movieId {key!r} has no IMDb id in {links_path.name}")
            kept = [g for g in parse_genres(row.values[genres]) if g.casefold() not in NOT_GENRES]
            if not kept:  # MovieLens' "(no genres listed)" means unknown, not "none of them"
                raise ValueError("MovieLens lists no genre for it")
            raw_title = row.values[title]
            return Record(
                movies, row.line, (normal, str(int(normal[2:]))), kept,
                year=parse_year(raw_title),
                extras={"title": plain_title(raw_title), "imdb_id": normal, "tmdb_id": tmdb_id, "movieId": key},
            )

        yield from records(movies, table, make)
