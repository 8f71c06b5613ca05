"""Importers, clean-up, split and stats, on tiny fixtures written in each dataset's real layout."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from helpers import assert_figure_has_content
from typer.testing import CliRunner

from posterfusion.errors import PosterFusionError
from posterfusion.importers import CleanupOptions, import_manifest, parse_merge, parse_title_types
from posterfusion.importers.base import Table, TableRow, imdb_id, parse_genres, parse_year
from posterfusion.manifest_cli import manifest_app
from posterfusion.manifest_tools import (
    manifest_stats,
    read_manifest,
    split_manifest,
    write_manifest,
)

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "movieposters"

_sizes = itertools.count()


def image(path: Path) -> Path:
    """A tiny poster; each call gets a distinct size, so no two files are identical by chance."""
    i = next(_sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (8 + i % 64, 8 + i // 64), (i * 40 % 256, 90, 160)).save(path, kind)
    return path


def run_import(fmt: str, source: Path, out_dir: Path, **options: object):
    """import_manifest with the manifest planned for ``out_dir/manifest.csv``."""
    images = options.pop("images", None)
    images = [images] if isinstance(images, Path) else images
    encoding = options.pop("encoding", None)
    return import_manifest(
        fmt, source, out_dir / "manifest.csv", images=images, encoding=encoding,
        options=CleanupOptions(**options),  # type: ignore[arg-type]
    )


def problems(result, kind: str | None = None) -> list[tuple[str, int | None, str]]:
    return [(p.file.name, p.line, p.reason) for p in result.problems if kind in (None, p.kind)]


def lines(result, kind: str) -> list[int | None]:
    return [p.line for p in result.problems if p.kind == kind]


# --- fixtures in each format's real layout ---------------------------------------------------

TMDB_COLUMNS = [
    "adult", "belongs_to_collection", "budget", "genres", "homepage", "id", "imdb_id",
    "original_language", "original_title", "overview", "popularity", "poster_path",
    "production_companies", "production_countries", "release_date", "revenue", "runtime",
    "spoken_languages", "status", "tagline", "title", "video", "vote_average", "vote_count",
]


def tmdb_row(**values: str) -> list[str]:
    row = {"adult": "False", "budget": "0", "original_language": "en", "status": "Released",
           "video": "False", **values}
    return [row.get(column, "") for column in TMDB_COLUMNS]


@pytest.fixture
def tmdb(tmp_path: Path) -> Path:
    """movies_metadata.csv with posters/ named by poster_path, as download scripts leave them."""
    root = tmp_path / "tmdb"
    posters = root / "posters"
    rows = [
        # line 2
        tmdb_row(genres="[{'id': 16, 'name': 'Animation'}, {'id': 35, 'name': 'Comedy'}, "
                 "{'id': 10751, 'name': 'Family'}]", id="862", imdb_id="tt0114709",
                 original_title="Toy Story", overview="Led by Woody, Andy's toys live happily.",
                 poster_path="/rhIRbceoE9lR4veEXuwCC2wARtG.jpg", release_date="1995-10-30",
                 title="Toy Story"),
        # lines 3-4: JSON quoting and an overview with a line break
        tmdb_row(genres='[{"id": 12, "name": "Adventure"}, {"id": 14, "name": "Fantasy"}, '
                 '{"id": 10751, "name": "Family"}]', id="8844", imdb_id="tt0113497",
                 overview="When siblings Judy and Peter\ndiscover an enchanted board game",
                 poster_path="/vzmL6fP7aPKNKPRTFnZmiUfciyV.jpg", release_date="1995-12-15",
                 title="Jumanji"),
        # line 5: unparseable genre list
        tmdb_row(genres="[{'id': 10749, 'name': 'Romance'", id="15602", imdb_id="tt0113228",
                 poster_path="/6ksm1sjKMFLbO7UY2i6G1ju9SML.jpg", release_date="1995-12-22",
                 title="Grumpier Old Men"),
        # line 6: the shifted rows of the real file put a date in id
        tmdb_row(genres="[]", id="1997-08-20", imdb_id="0", poster_path="", title="-"),
        # line 7: no poster_path; the download script named the file by TMDb id
        tmdb_row(genres="[{'id': 18, 'name': 'Drama'}]", id="31357", imdb_id="tt0114885",
                 release_date="1995-12-22", title="Waiting to Exhale"),
        # line 8: poster never downloaded
        tmdb_row(genres="[{'id': 35, 'name': 'Comedy'}]", id="11862", imdb_id="tt0113041",
                 poster_path="/e64sOI48hQXyru7naBFyssKFxVd.jpg", release_date="1995-02-10",
                 title="Father of the Bride Part II"),
        # line 9: nothing names the poster
        tmdb_row(genres="[{'id': 35, 'name': 'Comedy'}]", id="", imdb_id="", title="?"),
        # line 10: the real file repeats some movies
        tmdb_row(genres="[{'id': 16, 'name': 'Animation'}, {'id': 35, 'name': 'Comedy'}]",
                 id="862", imdb_id="tt0114709", poster_path="/rhIRbceoE9lR4veEXuwCC2wARtG.jpg",
                 release_date="1995-10-30", title="Toy Story"),
        # line 11
        tmdb_row(genres="[{'id': 18, 'name': 'Drama'}, {'id': 878, 'name': 'Science Fiction'}]",
                 id="19", imdb_id="tt0017136", poster_path="/hUK9rewffKGqtXynH5SW3v9hzcu.jpg",
                 release_date="1927-01-10", title="Metropolis"),
        # line 12: ids without names
        tmdb_row(genres="[28, 12]", id="5", imdb_id="tt0113101",
                 poster_path="/eQs5hh9rxrk1m4xHsIz1w11Ngqb.jpg", release_date="1995-12-09",
                 title="Four Rooms"),
    ]
    root.mkdir()
    with (root / "movies_metadata.csv").open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(TMDB_COLUMNS)
        writer.writerows(rows)
    for name in ["rhIRbceoE9lR4veEXuwCC2wARtG", "vzmL6fP7aPKNKPRTFnZmiUfciyV",
                 "6ksm1sjKMFLbO7UY2i6G1ju9SML", "31357", "hUK9rewffKGqtXynH5SW3v9hzcu",
                 "eQs5hh9rxrk1m4xHsIz1w11Ngqb"]:
        image(posters / f"{name}.jpg")
    return root / "movies_metadata.csv"


@pytest.fixture
def moviegenre(tmp_path: Path) -> Path:
    """MovieGenre.csv as Kaggle ships it: Latin-1, unpadded imdbId, quoted poster URLs."""
    root = tmp_path / "moviegenre"
    url = "https://images-na.ssl-images-amazon.com/images/M/MV5B{}._V1_UX182_CR0,0,182,268_AL_.jpg"
    rows = [
        ["114709", "http://www.imdb.com/title/tt114709", "Toy Story (1995)", "8.3",
         "Animation|Adventure|Comedy", url.format(1)],                          # line 2
        ["211915", "http://www.imdb.com/title/tt211915", "Amélie (2001)", "8.3",
         "Comedy|Romance", url.format(2)],                                      # line 3
        ["", "http://www.imdb.com/title/tt", "Nameless (1990)", "5.0", "Drama", url.format(3)],
        ["62622", "http://www.imdb.com/title/tt62622", "2001: A Space Odyssey (1968)", "8.3",
         "Adventure|Mystery|Sci-Fi", url.format(4)],                            # line 5
        ["113497", "http://www.imdb.com/title/tt113497", "Jumanji (1995)", "6.9", "[Adventure",
         url.format(5)],                                                        # line 6
        ["1234567", "http://www.imdb.com/title/tt1234567", "Unseen (2010)", "5.0", "Drama",
         url.format(6)],                                                        # line 7
        ["999999", "http://www.imdb.com/title/tt999999", "Untitled (2015)", "", "", url.format(7)],
    ]
    root.mkdir()
    with (root / "MovieGenre.csv").open("w", encoding="latin-1", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["imdbId", "Imdb Link", "Title", "IMDB Score", "Genre", "Poster"])
        writer.writerows(rows)
    for name in ["114709", "tt0211915", "62622", "113497", "999999"]:
        image(root / "posters" / f"{name}.jpg")
    return root / "MovieGenre.csv"


IMDB_HEADER = ("tconst\ttitleType\tprimaryTitle\toriginalTitle\tisAdult\tstartYear\tendYear\t"
               "runtimeMinutes\tgenres")
IMDB_ROWS = [
    "tt0000001\tshort\tCarmencita\tCarmencita\t0\t1894\t\\N\t1\tDocumentary,Short",       # 2
    "tt0114709\tmovie\tToy Story\tToy Story\t0\t1995\t\\N\t81\tAdventure,Animation,Comedy",
    "tt0133093\tmovie\tThe Matrix\tThe Matrix\t0\t1999\t\\N\t136\tAction,Sci-Fi",         # 4
    "tt0903747\ttvSeries\tBreaking Bad\tBreaking Bad\t0\t2008\t2013\t49\tCrime,Drama,Thriller",
    "\tmovie\tNo Id\tNo Id\t0\t2001\t\\N\t90\tDrama",                                     # 6
    'tt0050083\tmovie\t"12 Angry Men\t12 Angry Men\t0\t1957\t\\N\t96\tCrime,Drama',       # 7
    "tt0068646\tmovie\tThe Godfather\t1972\tCrime,Drama",                                 # 8
    "tt9999999\tmovie\tNo Genre\tNo Genre\t0\t2020\t\\N\t\\N\t\\N",                       # 9
    "tt0111161\tmovie\tThe Shawshank Redemption\tsame\t0\t1994\t\\N\t142\tDrama",         # 10
]


@pytest.fixture
def imdb(tmp_path: Path) -> Path:
    """title.basics.tsv: unquoted tabs (a bare quote in a title), \\N nulls, <tconst>.jpg."""
    root = tmp_path / "imdb"
    root.mkdir()
    (root / "title.basics.tsv").write_text("\n".join([IMDB_HEADER, *IMDB_ROWS]) + "\n", "utf-8")
    image(root / "images" / "tt0000001.png")
    for name in ["tt0114709", "tt0133093", "tt0903747", "tt0050083", "tt9999999"]:
        image(root / "images" / f"{name}.jpg")
    return root / "title.basics.tsv"


def write_imdb(folder: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """A title.basics.tsv of (tconst, titleType, startYear, genres) with a poster for each."""
    folder.mkdir(parents=True, exist_ok=True)
    text = [IMDB_HEADER] + [f"{t}\t{kind}\tT\tT\t0\t{year}\t\\N\t90\t{genres}"
                            for t, kind, year, genres in rows]
    (folder / "title.basics.tsv").write_text("\n".join(text) + "\n", "utf-8")
    for tconst, *_ in rows:
        image(folder / "posters" / f"{tconst}.jpg")
    return folder / "title.basics.tsv"


ONEHOT_TEXT = """Id,Genre,Action,Comedy,Drama,Horror
tt0086425,"['Comedy', 'Drama']",0,1,1,0
tt0085549,"['Drama', 'Romance', 'Music']",0,0,1,0
tt0086465,['Comedy'],0,1,0,0
tt0086567,['Horror'],0,0,0,2
,['Action'],1,0,0,0
tt0086979,"['Action', 'Horror']",1,0,0,1
tt0087332,['Action'],1,0,0,0
"""


@pytest.fixture
def onehot(tmp_path: Path) -> Path:
    """The Analytics Vidhya / Kaggle layout: train.csv (Id, Genre, one 0/1 column per genre)."""
    root = tmp_path / "onehot"
    root.mkdir()
    (root / "train.csv").write_text(ONEHOT_TEXT, "utf-8")
    for name in ["tt0086425", "tt0085549", "tt0086465", "tt0086567", "tt0086979"]:
        image(root / "Images" / f"{name}.jpg")
    return root / "train.csv"


@pytest.fixture
def mmimdb(tmp_path: Path) -> Path:
    """MM-IMDb: dataset/<id>.json beside <id>.jpeg, and split.json with train/dev/test ids."""
    root = tmp_path / "mmimdb"
    data = root / "dataset"
    data.mkdir(parents=True)
    movies = {
        "0000008": {"title": "Edison Kinetoscopic Record of a Sneeze", "year": 1894,
                    "kind": "movie", "genres": ["Documentary", "Short"],
                    "plot": ["A man sneezes."], "rating": 5.5, "cast": [{"name": "Fred Ott"}]},
        "0000012": {"title": "The Arrival of a Train", "year": 1896, "kind": "movie",
                    "genres": ["Documentary", "Short"], "plot": ["A train arrives."]},
        "0000131": {"title": "No genres here", "year": 1900},
        "0000417": {"title": "A Trip to the Moon", "genres": [28], "year": 1902},
        "0000439": {"title": "The Great Train Robbery", "genres": ["Western"], "year": 1903},
        "0133093": {"title": "The Matrix", "year": 1999, "kind": "movie",
                    "genres": ["Action", "Sci-Fi"], "plot": ["Neo.", "Wakes up."]},
    }
    for ident, movie in movies.items():
        (data / f"{ident}.json").write_text(json.dumps(movie, indent=2), "utf-8")
        if ident != "0000439":
            image(data / f"{ident}.jpeg")
    (data / "0000091.json").write_text('{\n"title": "x",\n"genres": ["Horror"\n}\n', "utf-8")
    image(data / "0000091.jpeg")
    (root / "split.json").write_text(
        json.dumps({"train": ["0000008", "0133093"], "dev": ["0000012"], "test": []}), "utf-8"
    )
    return root


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """One folder per genre, as small course datasets ship; one poster filed under two genres."""
    root = tmp_path / "folders"
    shared = image(root / "Action" / "a.jpg")
    image(root / "Action" / "b.jpg")
    image(root / "Comedy" / "c.jpg")
    shutil.copy(shared, root / "Comedy" / "a copy.jpg")
    image(root / "Horror" / "d.png")
    (root / "Horror" / "notes.txt").write_text("scary", "utf-8")
    (root / "Horror" / "empty.jpg").write_bytes(b"")
    image(root / "Horror" / ".ipynb_checkpoints" / "d-checkpoint.png")
    (root / "README.md").write_text("posters", "utf-8")
    return root


# --- formats ---------------------------------------------------------------------------------


def test_tmdb_reads_genre_dicts_and_finds_posters_by_any_name(tmdb: Path) -> None:
    result = run_import("tmdb", tmdb, tmdb.parent)
    frame = result.manifest
    assert list(frame.columns[:3]) == ["poster", "genres", "year"]
    assert list(frame["title"]) == ["Toy Story", "Jumanji", "Waiting to Exhale", "Metropolis"]
    assert list(frame["genres"]) == [
        "Animation|Comedy|Family", "Adventure|Fantasy|Family", "Drama", "Drama|Science Fiction",
    ]
    assert list(frame["year"]) == [1995, 1995, 1995, 1927]
    assert frame["poster"][0] == "posters/rhIRbceoE9lR4veEXuwCC2wARtG.jpg"
    assert frame["poster"][2] == "posters/31357.jpg"
    assert "\n" in frame["overview"][1] and "imdb_id" in frame.columns
    assert lines(result, "malformed") == [5, 6, 9, 12]
    assert lines(result, "missing") == [8]
    assert lines(result, "duplicate") == [10]
    reasons = dict((line, reason) for _, line, reason in problems(result))
    assert "cannot parse the genre list" in reasons[5]
    assert "'1997-08-20' is not a TMDb id" in reasons[6]
    assert "no poster_path, id or imdb_id" in reasons[9]
    assert "not a name" in reasons[12]
    assert "same image as" in reasons[10] and "movies_metadata.csv:2" in reasons[10]


def test_tmdb_min_year_and_explicit_images_folder(tmdb: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    result = run_import("tmdb", tmdb, out, images=tmdb.parent / "posters", min_year=1980)
    assert len(result.manifest) == 3 and result.filtered == 1
    assert all(Path(p).is_absolute() for p in result.manifest["poster"])


def test_moviegenre_latin1_titles_and_unpadded_ids(moviegenre: Path) -> None:
    result = run_import("moviegenre", moviegenre, moviegenre.parent)
    frame = result.manifest
    assert list(frame["Title"]) == [
        "Toy Story (1995)", "Amélie (2001)", "2001: A Space Odyssey (1968)", "Untitled (2015)"
    ]
    assert list(frame["year"]) == [1995, 2001, 1968, 2015]
    assert list(frame["imdb_id"]) == ["tt0114709", "tt0211915", "tt0062622", "tt0999999"]
    assert frame["poster"][1] == "posters/tt0211915.jpg"
    assert frame["genres"][3] == "" and result.unlabeled == 1
    assert frame["Poster"][0].endswith("CR0,0,182,268_AL_.jpg")
    assert problems(result, "malformed") == [
        ("MovieGenre.csv", 4, "no imdbId"),
        ("MovieGenre.csv", 6, "cannot parse the genre list '[Adventure'"),
    ]
    assert lines(result, "missing") == [7]


def test_movielens_joins_imdb_ids_and_finds_posters_in_several_folders(tmp_path: Path) -> None:
    """MovieLens has titles and genres, a poster collection named by IMDb id has the images."""
    root = tmp_path / "ml-25m"
    root.mkdir()
    (root / "movies.csv").write_text(
        "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'  # line 2: article moved to the front
        "29,City of Lost Children (Cité des enfants perdus) (1995),Adventure|IMAX\n"  # line 3: IMAX is no genre
        "30,Nameless (1996),(no genres listed)\n"  # line 4: unknown genres, not negatives
        "31,Unlinked (1997),Drama\n"  # line 5: no IMDb id
        "32,No Poster (1998),Drama\n", encoding="utf-8")  # line 6
    (root / "links.csv").write_text(
        "movieId,imdbId,tmdbId\n11,0112346,9087\n29,0112682,902\n30,0113000,\n32,0114000,1\n", encoding="utf-8")
    first, second = image(tmp_path / "repo" / "images" / "tt0112346.jpg"), image(tmp_path / "repo" / "en_90" / "tt0112682.jpg")
    image(tmp_path / "repo" / "en_90" / "tt0113000.jpg")
    result = run_import("movielens", root, tmp_path, images=[first.parent, second.parent])
    frame = result.manifest
    assert list(frame["title"]) == ["The American President", "City of Lost Children (Cité des enfants perdus)"]
    assert list(frame["genres"]) == ["Comedy|Drama|Romance", "Adventure"]
    assert list(frame["year"]) == [1995, 1995] and list(frame["imdb_id"]) == ["tt0112346", "tt0112682"]
    assert list(frame["poster"]) == ["repo/images/tt0112346.jpg", "repo/en_90/tt0112682.jpg"]
    assert problems(result, "malformed") == [("movies.csv", 4, "MovieLens lists no genre for it"),
                                             ("movies.csv", 5, "movieId '31' has no IMDb id in links.csv")]
    assert lines(result, "missing") == [6]
    with pytest.raises(PosterFusionError, match="no links.csv beside it"):
        (root / "links.csv").unlink()
        run_import("movielens", root, tmp_path)


def test_imdb_tsv_with_bare_quotes_nulls_and_title_types(imdb: Path) -> None:
    result = run_import("imdb", imdb, imdb.parent)
    frame = result.manifest.set_index("tconst")
    assert list(frame.index) == [
        "tt0000001", "tt0114709", "tt0133093", "tt0903747", "tt0050083", "tt9999999"
    ]
    assert frame.loc["tt0000001", "poster"] == "images/tt0000001.png"
    assert frame.loc["tt0050083", "primaryTitle"] == '"12 Angry Men'
    assert frame.loc["tt0133093", "genres"] == "Action|Sci-Fi"
    assert frame.loc["tt9999999", "genres"] == "" and frame.loc["tt9999999", "endYear"] == ""
    assert problems(result, "malformed") == [
        ("title.basics.tsv", 6, "no tconst"),
        ("title.basics.tsv", 8, "expected 9 fields, found 5"),
    ]
    assert lines(result, "missing") == [10]
    movies = run_import("imdb", imdb, imdb.parent, title_types=parse_title_types("Movie"),
                        min_year=1980).manifest
    assert list(movies["tconst"]) == ["tt0114709", "tt0133093", "tt9999999"]


def test_imdb_reads_the_gzip_imdb_publishes(imdb: Path) -> None:
    packed = imdb.parent / "title.basics.tsv.gz"
    packed.write_bytes(gzip.compress(imdb.read_bytes()))
    imdb.unlink()
    result = run_import("imdb", imdb.parent, imdb.parent)  # a folder finds the file in it
    assert len(result.manifest) == 6 and lines(result, "malformed") == [6, 8]


def test_onehot_columns_become_genres(onehot: Path) -> None:
    result = run_import("onehot", onehot, onehot.parent)
    frame = result.manifest
    assert list(frame.columns) == ["poster", "genres", "Id", "Genre"]
    assert list(frame["Id"]) == ["tt0086425", "tt0085549", "tt0086465", "tt0086979"]
    assert list(frame["genres"]) == ["Comedy|Drama", "Drama", "Comedy", "Action|Horror"]
    assert frame["poster"][0] == "Images/tt0086425.jpg"
    assert problems(result, "malformed") == [
        ("train.csv", 5, "column 'Horror' holds '2', not 0 or 1"),
        ("train.csv", 6, "no image id in column 'Id'"),
    ]
    assert lines(result, "missing") == [8]


def test_mmimdb_json_files_and_official_split(mmimdb: Path) -> None:
    result = run_import("mmimdb", mmimdb, mmimdb)
    frame = result.manifest.set_index("id")
    assert list(frame.index) == ["0000008", "0000012", "0133093"]
    assert frame.loc["0133093", "poster"] == "dataset/0133093.jpeg"
    assert frame.loc["0133093", "genres"] == "Action|Sci-Fi"
    assert frame.loc["0133093", "plot"] == "Neo.|Wakes up."
    assert list(frame["split"]) == ["train", "val", "train"]
    assert "cast" not in frame.columns and frame.loc["0000008", "year"] == 1894
    assert problems(result, "malformed") == [
        ("0000091.json", 4, "not valid JSON: Expecting ',' delimiter"),
        ("0000131.json", None, "no 'genres' field"),
        ("0000417.json", None, "the genre list holds 28, not a name or an {'id', 'name'} dict"),
    ]
    assert problems(result, "missing")[0][0] == "0000439.json"
    # Pointing at dataset/ itself works too.
    assert len(run_import("mmimdb", mmimdb / "dataset", mmimdb).manifest) == 3


def test_folders_genre_names_and_duplicates_across_genres(folders: Path) -> None:
    result = run_import("folders", folders, folders)
    frame = result.manifest.set_index("poster")
    assert dict(frame["genres"]) == {
        "Action/a.jpg": "Action|Comedy", "Action/b.jpg": "Action", "Comedy/c.jpg": "Comedy",
        "Horror/d.png": "Horror",
    }
    assert problems(result, "malformed") == [("notes.txt", None, "not an image (.txt)")]
    assert [p[0] for p in problems(result, "missing")] == ["empty.jpg"]
    assert [p[0] for p in problems(result, "duplicate")] == ["a copy.jpg"]


def test_folders_under_split_folders_keep_the_split(tmp_path: Path) -> None:
    for split, genre, name in [("train", "Action", "a"), ("train", "Drama", "b"),
                               ("valid", "Action", "c"), ("test", "Drama", "d")]:
        image(tmp_path / "course" / split / genre / f"{name}.jpg")
    frame = run_import("folders", tmp_path / "course", tmp_path).manifest
    assert sorted(zip(frame["split"], frame["genres"])) == [
        ("test", "Drama"), ("train", "Action"), ("train", "Drama"), ("val", "Action"),
    ]


# --- encodings and broken files ----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-8-sig"])
def test_utf16_and_bom_files_read_like_utf8(onehot: Path, encoding: str) -> None:
    onehot.write_bytes(ONEHOT_TEXT.encode(encoding))
    result = run_import("onehot", onehot, onehot.parent)
    assert list(result.manifest["Id"]) == ["tt0086425", "tt0085549", "tt0086465", "tt0086979"]
    assert lines(result, "malformed") == [5, 6]


def test_bytes_that_are_not_utf8_are_reported_per_row(onehot: Path) -> None:
    text = ONEHOT_TEXT.replace("['Comedy'],", "['Comédie'],")
    onehot.write_bytes(text.encode("cp1252"))
    result = run_import("onehot", onehot, onehot.parent)
    assert len(result.manifest) == 3
    (line, reason), = [(p.line, p.reason) for p in result.problems if "not utf-8" in p.reason]
    assert line == 4 and "byte 0xE9" in reason and "--encoding" in reason
    fixed = run_import("onehot", onehot, onehot.parent, encoding="cp1252").manifest
    assert "['Comédie']" in list(fixed["Genre"])


def test_unbalanced_quote_costs_one_row(tmp_path: Path) -> None:
    rows = [f"tt{i:07d},x,1" for i in range(80)]
    rows.insert(3, 'tt9999999,"broken,1')
    path = tmp_path / "t.csv"
    path.write_text("Id,Title,Action\n" + "\n".join(rows) + "\n", "utf-8")
    with Table(path) as table:
        items = list(table)
    good = [item for item in items if isinstance(item, TableRow)]
    bad = [item for item in items if not isinstance(item, TableRow)]
    assert len(good) == 80 and [p.line for p in bad] == [5]
    assert "quote" in bad[0].reason
    assert good[3].line == 6 and good[3].values["Id"] == "tt0000003"


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "binary file"),
     (b"PK\x03\x04\x14\x00\x00\x00", "zip archive"),
     (b"", "is empty"),
     (b"title,year\nx,1999\n", "no 'genres' column")],
)
def test_unusable_files_are_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "movies_metadata.csv").write_bytes(content)
    with pytest.raises(PosterFusionError, match=message):
        run_import("tmdb", tmp_path / "movies_metadata.csv", tmp_path)


@pytest.mark.parametrize(
    ("text", "genres"),
    [("Action|Comedy", ["Action", "Comedy"]), ("Action, Comedy", ["Action", "Comedy"]),
     ("['Drama', 'Romance']", ["Drama", "Romance"]), ('["Drama"]', ["Drama"]),
     ("[{'id': 878, 'name': 'Science Fiction'}]", ["Science Fiction"]),
     ('[{"id": 28, "name": "Action"}]', ["Action"]), ("\\N", []), ("", []), ("[]", []),
     ("  Film-Noir | Film-Noir ", ["Film-Noir"]), ("Sci  Fi", ["Sci Fi"]),
     ("(no genres listed)", [])],
)
def test_parse_genres_accepts_every_spelling(text: str, genres: list[str]) -> None:
    assert parse_genres(text) == genres


@pytest.mark.parametrize("text", ["[{'id': 28", "[28, 12]", "[{'id': 28}]", "12|Drama"])
def test_parse_genres_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError):
        parse_genres(text)


def test_ids_and_years() -> None:
    assert imdb_id("114709") == imdb_id("tt0114709") == imdb_id("0114709") == "tt0114709"
    assert imdb_id("tt") is None and imdb_id("abc") is None
    assert parse_year("2001: A Space Odyssey (1968)") == 1968
    assert parse_year("1995-10-30") == 1995 and parse_year("\\N") is None


# --- shared clean-up ---------------------------------------------------------------------------


def test_merge_unifies_case_and_maps_names(tmp_path: Path) -> None:
    source = write_imdb(tmp_path / "m", [
        ("tt0000001", "movie", "1990", "Music"), ("tt0000002", "movie", "1990", "musical"),
        ("tt0000003", "movie", "1990", "Sci-Fi,Short"), ("tt0000004", "movie", "1990", "sci-fi"),
        ("tt0000005", "movie", "1990", "Sci-Fi,Musical"),
    ])
    merge = parse_merge(["Music,Musical=Music", "Short="])
    frame = run_import("imdb", source, tmp_path, merge=merge).manifest
    assert list(frame["genres"]) == ["Music", "Music", "Sci-Fi", "Sci-Fi", "Sci-Fi|Music"]
    with pytest.raises(PosterFusionError, match="is not 'Old,Other=New'"):
        parse_merge(["Music"])


def test_rare_genres_dropped_or_merged_into_other(tmp_path: Path) -> None:
    rows = [(f"tt{i:07d}", "movie", "2000", g) for i, g in enumerate(
        ["Drama", "Drama,News", "Drama", "Comedy,Short", "Comedy", "Comedy,Drama", "News"])]
    source = write_imdb(tmp_path / "r", rows)
    other = run_import("imdb", source, tmp_path, other_below=3)
    assert list(other.manifest["genres"]) == [
        "Drama", "Drama|Other", "Drama", "Comedy|Other", "Comedy", "Comedy|Drama", "Other"
    ]
    assert other.rare_genres == {"News": 2, "Short": 1} and other.rare_into == "Other"
    dropped = run_import("imdb", source, tmp_path, drop_below=3)
    assert list(dropped.manifest["genres"])[-1] == "" and dropped.unlabeled == 1
    with pytest.raises(PosterFusionError, match="pass one"):
        CleanupOptions(drop_below=2, other_below=2)


def test_duplicates_found_by_content_not_name(tmp_path: Path) -> None:
    source = write_imdb(tmp_path / "d", [("tt0000001", "movie", "2000", "Drama"),
                                         ("tt0000002", "movie", "2000", "Horror"),
                                         ("tt0000003", "movie", "2000", "Comedy")])
    posters = source.parent / "posters"
    shutil.copy(posters / "tt0000001.jpg", posters / "tt0000003.jpg")
    result = run_import("imdb", source, tmp_path)
    assert list(result.manifest["genres"]) == ["Drama|Comedy", "Horror"]
    assert problems(result, "duplicate") == [
        ("title.basics.tsv", 4, f"same image as {source}:2; genres merged")
    ]


# --- split and stats ---------------------------------------------------------------------------


def synthetic_manifest(n: int = 300, seed: int = 3) -> pd.DataFrame:
    rng = random.Random(seed)
    names = ["Drama", "Comedy", "Action", "Horror", "Romance", "Western", "Film-Noir"]
    weights = [0.5, 0.3, 0.2, 0.15, 0.12, 0.05, 0.04]
    genres = ["|".join(g for g, w in zip(names, weights) if rng.random() < w) for _ in range(n)]
    return pd.DataFrame({"poster": [f"p/{i}.jpg" for i in range(n)], "genres": genres})


def test_split_proportions_and_every_genre_in_every_split() -> None:
    frame = synthetic_manifest()
    result = split_manifest(frame, 0.15, 0.15, seed=7)
    sizes = result["split"].value_counts()
    assert abs(sizes["val"] - 45) <= 3 and abs(sizes["test"] - 45) <= 3
    stats = manifest_stats(result)
    for genre, count in stats.counts.items():
        for split in ("val", "test"):
            share = stats.splits[split].get(genre, 0) / count
            assert share > 0, f"{genre} absent from {split}"
            assert abs(share - 0.15) < 0.1, (genre, split, share)
    assert result["split"].equals(split_manifest(frame, 0.15, 0.15, seed=7)["split"])
    assert not result["split"].equals(split_manifest(frame, 0.15, 0.15, seed=8)["split"])
    assert list(result["poster"]) == list(frame["poster"])


def test_split_edge_cases() -> None:
    single = pd.DataFrame({"poster": [f"{i}.jpg" for i in range(20)],
                           "genres": ["Drama"] * 10 + [""] * 10})
    result = split_manifest(single, 0.2, 0.0)
    assert set(result["split"]) == {"train", "val"} and (result["split"] == "val").sum() == 4
    with pytest.raises(PosterFusionError, match="already has a split"):
        split_manifest(result, 0.2, 0.0)
    assert split_manifest(result, 0.5, 0.0, force=True)["split"].value_counts()["val"] == 10
    with pytest.raises(PosterFusionError, match="sum below 1"):
        split_manifest(single, 0.6, 0.5)


def test_stats_counts_cardinality_and_pairs() -> None:
    frame = pd.DataFrame({"poster": list("abcd"),
                          "genres": ["Drama|Romance", "Drama", "Drama|Romance|War", ""]})
    stats = manifest_stats(frame)
    assert stats.counts == {"Drama": 3, "Romance": 2, "War": 1}
    assert stats.per_poster == {0: 1, 1: 1, 2: 1, 3: 1}
    assert stats.cardinality == 1.5 and stats.density == 0.5
    assert stats.pairs[0] == ("Drama", "Romance", 2) and len(stats.pairs) == 3


# --- CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_import_prints_problems_and_summary(tmdb: Path, tmp_path: Path) -> None:
    out = tmdb.parent / "manifest.csv"
    report = tmp_path / "problems.csv"
    result = runner.invoke(manifest_app, [
        "import", "tmdb", str(tmdb), "--out", str(out), "--report", str(report),
        "--merge", "Science Fiction=Sci-Fi",
    ])
    assert result.exit_code == 0, result.output
    assert "movies_metadata.csv:5: cannot parse the genre list" in result.output
    assert ("Imported 4 posters with 7 genres into" in result.output
            and "skipped 4 malformed rows, 1 missing image, 1 duplicate" in result.output)
    manifest = read_manifest(out)
    assert manifest["genres"][3] == "Drama|Sci-Fi"
    assert (tmdb.parent / manifest["poster"][0]).is_file()
    rows = list(csv.DictReader(report.read_text("utf-8").splitlines()))
    assert [(r["line"], r["kind"]) for r in rows] == [
        ("5", "malformed"), ("6", "malformed"), ("9", "malformed"), ("12", "malformed"),
        ("8", "missing"), ("10", "duplicate"),
    ]


def test_cli_caps_the_problem_listing(tmp_path: Path) -> None:
    rows = [(f"tt{i:07d}", "movie", "2000", "Drama") for i in range(30)]
    source = write_imdb(tmp_path / "many", rows)
    for poster in list((source.parent / "posters").iterdir())[:25]:
        poster.unlink()
    result = runner.invoke(manifest_app, ["import", "imdb", str(source), "-o",
                                          str(tmp_path / "m.csv")])
    assert result.exit_code == 0, result.output
    assert result.output.count("image not found") == 20
    assert "... and 5 more (list them all with --report problems.csv)" in result.output
    assert "Imported 5 posters" in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["import", "imdb", "missing.tsv", "-o", "m.csv"], "does not exist"),
     (["import", "imdb", "{imdb}", "-o", "m.csv", "--merge", "oops"], "is not 'Old,Other=New'"),
     (["import", "imdb", "{imdb}", "-o", "m.csv", "--min-year", "2200"], "no posters left"),
     (["import", "folders", "{imdb}", "-o", "m.csv", "--images", "."], "not used by the folders"),
     (["split", "missing.csv"], "no such manifest"),
     (["stats", "{imdb}"], "not a readable CSV manifest: Error tokenizing data"),
     (["stats", "{plain}"], "has no 'poster' column")],
)
def test_cli_user_errors_are_one_line(imdb: Path, arguments: list[str], message: str,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.csv").write_text("title,year\nx,1999\n", "utf-8")
    arguments = [a.format(imdb=imdb, plain="plain.csv") for a in arguments]
    result = runner.invoke(manifest_app, arguments)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_cli_split_then_stats_with_chart(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    write_manifest(synthetic_manifest(), manifest)
    out = tmp_path / "sub" / "split.csv"
    result = runner.invoke(manifest_app, ["split", str(manifest), "--val", "0.2", "--test",
                                          "0.1", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Split 300 posters into train" in result.output
    frame = read_manifest(out)
    assert frame["poster"][0] == str(tmp_path / "p" / "0.jpg")  # re-aimed, still valid
    chart = tmp_path / "genres.png"
    result = runner.invoke(manifest_app, ["stats", str(out), "--plot", str(chart)])
    assert result.exit_code == 0, result.output
    assert "label cardinality" in result.output and "Film-Noir" in result.output
    assert "Co-occurrence" in result.output and "val" in result.output
    assert_figure_has_content(chart)


# --- real posters ------------------------------------------------------------------------------


@pytest.fixture
def real_sample() -> pd.DataFrame:
    if not (REAL / "labels.csv").is_file():
        pytest.skip(f"real posters not found at {REAL}")
    return pd.read_csv(REAL / "labels.csv", dtype=str, keep_default_na=False).sample(
        30, random_state=1
    )


@pytest.mark.slow
def test_real_posters_through_imdb_layout(real_sample: pd.DataFrame, tmp_path: Path) -> None:
    lines_ = [IMDB_HEADER] + [
        f"{r.imdb_id}\tmovie\t{r.title}\t{r.title}\t0\t{r.year}\t\\N\t90\t"
        f"{r.genres.replace('|', ',')}"
        for r in real_sample.itertuples()
    ]
    source = tmp_path / "title.basics.tsv"
    source.write_text("\n".join(lines_) + "\n", "utf-8")
    out = tmp_path / "manifest.csv"
    result = runner.invoke(manifest_app, ["import", "imdb", str(source), "--images",
                                          str(REAL / "posters"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = read_manifest(out)
    assert len(frame) == 30
    assert list(frame["genres"]) == list(real_sample["genres"])
    assert all(Path(p).is_file() for p in frame["poster"])
    assert runner.invoke(manifest_app, ["split", str(out), "--val", "0.2", "--test",
                                        "0.2"]).exit_code == 0
    assert set(read_manifest(out)["split"]) == {"train", "val", "test"}


@pytest.mark.slow
def test_real_posters_through_folders_layout(real_sample: pd.DataFrame, tmp_path: Path) -> None:
    for row in real_sample.itertuples():
        genre = row.genres.split("|")[0]
        (tmp_path / "course" / genre).mkdir(parents=True, exist_ok=True)
        (tmp_path / "course" / genre / Path(row.poster).name).symlink_to(REAL / row.poster)
    result = run_import("folders", tmp_path / "course", tmp_path / "course")
    assert len(result.manifest) == 30 and not result.problems
    expected = {Path(r.poster).name: r.genres.split("|")[0] for r in real_sample.itertuples()}
    assert {Path(p).name: g for p, g in zip(result.manifest["poster"],
                                           result.manifest["genres"])} == expected


@pytest.mark.parametrize("command", ["import", "split", "stats --plot"])
def test_cli_writers_on_a_full_disk_say_so_in_one_line_and_leave_no_file(command: str, tmp_path: Path) -> None:
    from helpers import tmpfs

    rows = [(f"tt{i:07d}", "movie", "2000", "Drama,Comedy") for i in range(400)]  # ~16 KB of manifest
    source = write_imdb(tmp_path / "imdb", rows)
    manifest = tmp_path / "m.csv"
    write_manifest(synthetic_manifest(2000), manifest)
    with tmpfs(tmp_path / "full", "size=8k") as full:
        arguments = {
            "import": ["import", "imdb", str(source), "-o", str(full / "m.csv")],
            "split": ["split", str(manifest), "--out", str(full / "split.csv")],
            "stats --plot": ["stats", str(manifest), "--plot", str(full / "genres.png")],
        }[command]
        result = runner.invoke(manifest_app, arguments)
        left = sorted(p.name for p in full.iterdir())
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {full}/") and "disk full; nothing half-written was left there" in last
    assert left == []
